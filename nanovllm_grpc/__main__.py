from nanovllm_grpc.cli import main

main()
