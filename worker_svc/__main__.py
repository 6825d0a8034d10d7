from worker_svc.server import main

main()
