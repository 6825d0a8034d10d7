"""What a newcomer reads when the services start, or fail to: the start-up log says what runs where
and how much fits, and a mistake ends in one line that names it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanovllm_grpc import __version__
from tests.polling import OutputProcess, free_port


def python(*argv: str) -> OutputProcess:
    return OutputProcess([sys.executable, *argv])


def test_a_scheduler_says_whom_it_waits_for_and_both_log_what_they_run(tiny_model_dir: Path) -> None:
    worker_port = free_port()
    argv = ["--model", str(tiny_model_dir), "--workers", f"127.0.0.1:{worker_port}", "--port", "0"]
    scheduler = python("-m", "scheduler_svc", *argv)
    worker = None
    try:
        assert f"nanovllm-grpc {__version__} scheduler" in scheduler.wait_for("scheduler for")
        assert f"waiting for 1 worker(s): 127.0.0.1:{worker_port}" in scheduler.wait_for("waiting for")
        worker = python(
            "-m", "worker_svc", "--model", str(tiny_model_dir), "--port", str(worker_port), "--device", "cpu",
            "--num-kvcache-blocks", "32", "--max-model-len", "256",
        )  # fmt: skip
        assert f"nanovllm-grpc {__version__} worker rank 0 of 1" in worker.wait_for("worker rank 0 of 1")
        assert "dtype torch.float32, device cpu, attention backend torch" in worker.wait_for("attention backend")
        kv = worker.wait_for("KV cache:")
        assert "32 blocks of 16 tokens = 512 tokens" in kv and "max model len 256" in kv
        assert "CUDA graphs: none (eager)" in worker.wait_for("CUDA graphs:")
        worker.wait_for("ready in")
        ready = scheduler.wait_for("ready in")
        assert "max model len 256, KV cache 32 blocks of 16 = 512 tokens over 1 rank(s)" in ready
        scheduler.wait_for("nanovllm scheduler ready on")
    finally:
        scheduler.stop()
        if worker is not None:
            worker.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a host without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tiny_model_dir: Path) -> None:
    argv = ["-m", "worker_svc", "--model", str(tiny_model_dir), "--device", "cuda", "--port", "0"]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "nanovllm worker rank 0: device 'cuda' needs a GPU, and torch sees none (use --device cpu)"


def test_a_taken_metrics_port_is_named(tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["-m", "scheduler_svc", "--model", str(tiny_model_dir), "--workers", "127.0.0.1:1", "--port", "0"]
        argv += ["--metrics-port", str(port)]
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanovllm scheduler: cannot serve metrics on 127.0.0.1:{port}: "), out.stderr
