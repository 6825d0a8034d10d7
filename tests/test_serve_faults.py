"""`nanovllm serve` as an operator meets its faults: a worker that dies is restarted and its requests
resume; a launcher that is SIGKILLed leaves no process or socket behind; a port in use is an error."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

from tests.faults import ServeProcess, alive, children, run_streams, wait_for
from tests.test_recovery import MAX_TOKENS, make_jobs


def test_serve_restarts_a_killed_worker_and_its_requests_resume(tiny_model_dir) -> None:
    serve = ServeProcess(tiny_model_dir, "--num-kvcache-blocks", "256", "--metrics-port", "0")
    try:
        serve.wait_ready()
        jobs = make_jobs(50, seed=1)
        reference = run_streams(serve.addr, jobs)
        assert all(isinstance(t, list) and len(t) == MAX_TOKENS for t in reference), reference
        (first,) = serve.worker_pids()
        out = run_streams(serve.addr, jobs, {300: lambda: os.kill(first, signal.SIGKILL)})
        assert out == reference
        wait_for("a new worker", lambda: len(serve.worker_pids()) == 2, 60)
        log = "".join(serve.lines)
        assert "restarting the workers" in log and re.search(r"resuming \d+ requests", log), log

        def settled() -> bool:  # every KV block back, as the metrics endpoint tells
            m = serve.metrics()
            return m["nanovllm_kv_blocks_free"] == 256 and m["nanovllm_num_requests_running"] == 0

        wait_for("every KV block free", settled, 10)
        m = serve.metrics()
        assert m["nanovllm_worker_restarts_total"] == 1 and m["nanovllm_requests_resumed_total"] > 0, m
    finally:
        serve.stop()


def test_sigkill_of_serve_leaves_no_process_and_no_socket(tiny_model_dir, tmp_path) -> None:
    serve = ServeProcess(tiny_model_dir, env={"TMPDIR": str(tmp_path)})
    try:
        serve.wait_ready()
        kids = children(serve.proc.pid)
        assert len(kids) >= 2, kids  # the worker and the engine core (with multiprocessing's helper)
        serve.proc.kill()
        serve.proc.wait()
        wait_for("every process of serve gone", lambda: not any(alive(p) for p in kids), 2)
        assert not list(tmp_path.glob("nanovllm-core-*")), list(tmp_path.iterdir())
    finally:
        serve.stop()


def test_a_used_port_is_an_error_naming_it(tiny_model_dir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        model = ["--model", str(tiny_model_dir), "--port", str(port)]
        serve = [sys.executable, "-c", "from nanovllm_grpc.cli import main; main()", "serve", *model, "--device", "cpu"]
        scheduler = [sys.executable, "-m", "scheduler_svc", *model, "--workers", "127.0.0.1:1"]
        worker = [sys.executable, "-m", "worker_svc", *model, "--device", "cpu"]
        for cmd in (serve, scheduler, worker):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert res.returncode != 0
            assert f"127.0.0.1:{port}" in res.stderr and "in use" in res.stderr, res.stderr
