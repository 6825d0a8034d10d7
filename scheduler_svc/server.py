"""Runs the scheduler: the public gRPC server in front of one engine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc

from proto import generate_pb2_grpc as pbg
from scheduler_svc.engine import Engine, EngineConfig
from scheduler_svc.interceptor import ErrorInterceptor
from scheduler_svc.servicer import GenerationServicer

log = logging.getLogger("scheduler")


def add_args(p: argparse.ArgumentParser) -> None:
    """Scheduler flags; `nanovllm serve` shares them."""
    p.add_argument("--model", required=True, help="model directory (tokenizer + config.json)")
    p.add_argument("--served-model-name", default="", help="name reported by GetModelInfo (default: the dir name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument(
        "--max-inflight-steps", type=int, default=2, choices=(1, 2), help="2: send step N+1 before N returns"
    )
    p.add_argument("--max-queued-requests", type=int, default=0, help="0: unbounded")


def engine_config(args: argparse.Namespace, workers: list[str]) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        worker_addresses=tuple(workers),
        model_name=args.served_model_name or Path(args.model).name,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_inflight_steps=args.max_inflight_steps,
        max_queued_requests=args.max_queued_requests,
    )


class SchedulerServer:
    """The engine plus the public gRPC server in front of it."""

    def __init__(self, config: EngineConfig, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.engine = Engine(config)
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        pbg.add_GenerationServicer_to_server(GenerationServicer(self.engine, config.model_name), self.server)

    async def start(self) -> int:
        """Connects to the workers, then serves; returns the bound port."""
        await self.engine.start()
        self.port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        await self.server.start()
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)
        await self.engine.stop()


async def serve(config: EngineConfig, host: str, port: int, stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or SIGINT/SIGTERM when it is None)."""
    server = SchedulerServer(config, host, port)
    bound = await server.start()
    print(f"nanovllm scheduler ready on {host}:{bound}", flush=True)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc", description="nanovllm scheduler service")
    add_args(p)
    p.add_argument("--workers", required=True, help="comma-separated worker addresses, rank 0 first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(engine_config(args, args.workers.split(",")), args.host, args.port))
