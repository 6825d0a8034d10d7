"""Runs one worker process: one tensor-parallel rank holding weights and its share of the KV cache."""

from __future__ import annotations

import argparse
import gc
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

from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from worker_svc.config import WorkerConfig
from worker_svc.flags import add_args
from worker_svc.servicer import WorkerServicer

if TYPE_CHECKING:
    from worker_svc.model_runner import ModelRunner

log = logging.getLogger("worker")
WORKER = wpb.DESCRIPTOR.services_by_name["Worker"].full_name


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device or default_device(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.kvcache_block_size,
        kv_cache_dtype=args.kv_cache_dtype,
        num_kv_blocks=args.num_kvcache_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
    )


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
                ("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20),
                # The scheduler pings every 2 s, idle too, to find a hung worker (worker_client.py).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
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


def settle_heap() -> None:
    """Takes what start-up allocated out of the garbage collector's sight and makes collections
    rarer. Each step makes thousands of short-lived objects; with the default thresholds the
    collections they trigger kept walking the whole start-up heap: 20-30% of the host time of a
    batch-256 step."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m worker_svc", description="nanovllm worker (one rank)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--dist-addr", default="127.0.0.1", help="address of rank 0's process-group store")
    p.add_argument("--dist-port", type=int, default=29500)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds to wait for the scheduler to leave"
    )
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{args.rank}] %(levelname)s %(message)s")
    config = worker_config(args)
    if not 0 <= args.rank < config.tensor_parallel_size:
        p.error(f"--rank must be in [0, {config.tensor_parallel_size}), got {args.rank}")

    servicer = WorkerServicer(args.rank, config.tensor_parallel_size, config.device)
    try:
        server = WorkerServer(servicer, args.host, args.port)
    except OSError as e:
        sys.exit(f"nanovllm worker rank {args.rank}: {e}")
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

        if config.tensor_parallel_size > 1:
            # Checked before joining the process group: a rank that cannot take its share must fail
            # at once, not after waiting for peers that may never come.
            try:
                ModelArch.read(config.model).check_tensor_parallel(config.tensor_parallel_size)
            except ValueError as e:
                sys.exit(f"nanovllm worker rank {args.rank}: {e}")
            init_distributed(config, args.rank, args.dist_addr, args.dist_port)
        server.ready(ModelRunner(config, args.rank, config.tensor_parallel_size))
        settle_heap()
        print(f"nanovllm worker rank {args.rank} ready on {args.host}:{server.port} (pid {os.getpid()})", flush=True)
        stop.wait()
        log.info("draining: waiting up to %g s for the scheduler to disconnect", args.shutdown_timeout)
        server.drain(args.shutdown_timeout, force)
    finally:
        server.stop()
