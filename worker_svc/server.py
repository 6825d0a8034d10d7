"""Runs one worker process: one tensor-parallel rank holding weights and its share of the KV cache."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nanovllm_grpc import __version__
from nanovllm_grpc.process import PING_INTERVAL_MS, STEP_STREAM_OPTIONS, settle_heap
from nanovllm_grpc.settings import add_flags, build
from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from worker_svc.config import WorkerConfig
from worker_svc.servicer import WorkerServicer

if TYPE_CHECKING:
    from worker_svc.model_runner import ModelRunner

log = logging.getLogger("worker")
WORKER = wpb.DESCRIPTOR.services_by_name["Worker"].full_name


def init_distributed(config: WorkerConfig, rank: int, dist_addr: str, dist_port: int) -> None:
    import torch
    import torch.distributed as dist

    if config.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{dist_addr}:{dist_port}", rank=rank, world_size=config.tensor_parallel_size
    )


class WorkerServer:
    """The worker's gRPC server: Worker and standard health, NOT_SERVING until the model runner is built."""

    def __init__(self, servicer: WorkerServicer, host: str, port: int) -> None:
        self.servicer = servicer
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                *STEP_STREAM_OPTIONS,
                # The scheduler pings every PING_INTERVAL_MS, idle too, to find a hung worker (worker_client.py).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", PING_INTERVAL_MS // 2),
                # Without SO_REUSEPORT a second worker on a port in use fails instead of sharing it.
                ("grpc.so_reuseport", 0),
            ],
        )
        wgrpc.add_WorkerServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise OSError(f"cannot listen on {host}:{port}: the port is in use or not this host's") from e
        self.server.start()

    def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", WORKER):
            self.health.set(service, status)

    def ready(self, runner: ModelRunner) -> None:
        """Called once the weights are loaded and warmed up (the runner does both when built)."""
        self.servicer.runner = runner
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, timeout: float, force: threading.Event) -> None:
        """NOT_SERVING from now on; waits up to `timeout` s for the scheduler to finish its requests and
        close its step stream, so that a worker stopped with its scheduler never fails their requests."""
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout
        while self.servicer.connected() and time.monotonic() < deadline and not force.is_set():
            force.wait(0.1)

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


def log_ready(runner: ModelRunner, seconds: float) -> None:
    """What a vLLM user looks for in the start-up log: what runs where, and how much fits."""
    cfg = runner.config
    cache_gib = runner.kv_cache.numel() * runner.kv_cache.element_size() / 2**30
    tokens = runner.num_kv_blocks * runner.block_size
    log.info(
        "model %s, dtype %s, device %s, attention backend %s",
        cfg.model,
        runner.dtype,
        runner.device,
        runner.model_backend,
    )
    log.info(
        "KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB (%s); max model len %d",
        runner.num_kv_blocks, runner.block_size, tokens, cache_gib, runner.cache_dtype, runner.max_model_len,
    )  # fmt: skip
    log.info("CUDA graphs: %s", runner.graphs.describe() if runner.graphs is not None else "none (eager)")
    log.info("ready in %.1f s", seconds)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker_svc", description="nanovllm worker (one rank)")
    add_flags(p, WorkerConfig, "worker")
    return p


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    p = parser()
    args = p.parse_args(argv)
    try:
        config: WorkerConfig = build(WorkerConfig, vars(args))
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{config.rank}] %(levelname)s %(message)s")
    rank = config.rank
    log.info(
        "nanovllm-grpc %s worker rank %d of %d (pid %d)", __version__, rank, config.tensor_parallel_size, os.getpid()
    )
    servicer = WorkerServicer(rank, config.tensor_parallel_size, config.device or "")
    try:
        server = WorkerServer(servicer, config.host, config.port)
    except OSError as e:
        sys.exit(f"nanovllm worker rank {rank}: {e}")
    stop, force = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if servicer.runner is None:
            raise SystemExit(0)  # still loading: nothing to drain
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        from worker_svc.model_runner import ModelRunner  # torch import after the port is taken
        from worker_svc.models.arch import ModelArch
        from worker_svc.placement import resolve_device

        try:
            config = resolve_device(config)
            if config.tensor_parallel_size > 1:
                # Checked before joining the process group: a rank that cannot take its share must fail
                # at once, not after waiting for peers that may never come.
                ModelArch.read(config.model).check_tensor_parallel(config.tensor_parallel_size)
                init_distributed(config, rank, config.dist_addr, config.dist_port)
            runner = ModelRunner(config, rank, config.tensor_parallel_size)
        except ValueError as e:
            sys.exit(f"nanovllm worker rank {rank}: {e}")
        server.ready(runner)
        settle_heap()
        log_ready(runner, time.monotonic() - started)
        print(f"nanovllm worker rank {rank} ready on {config.host}:{server.port} (pid {os.getpid()})", flush=True)
        stop.wait()
        log.info("draining: waiting up to %g s for the scheduler to disconnect", config.shutdown_timeout)
        server.drain(config.shutdown_timeout, force)
    finally:
        server.stop()
