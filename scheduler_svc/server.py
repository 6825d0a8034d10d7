"""Runs the scheduler: the public gRPC server (Generation, health, reflection) in front of one engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pbg
from scheduler_svc.core import settle_heap
from scheduler_svc.engine import Engine, EngineConfig
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.flags import add_args
from scheduler_svc.interceptor import ErrorInterceptor
from scheduler_svc.servicer import GenerationServicer
from scheduler_svc.status import StatusLog

log = logging.getLogger("scheduler")

GENERATION = pb.DESCRIPTOR.services_by_name["Generation"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        stream_interval=args.stream_interval,
        core_process=not args.no_core_process,
        worker_step_timeout=args.worker_step_timeout,
        worker_recovery_timeout=args.worker_recovery_timeout,
        max_prompt_bytes=args.max_prompt_bytes,
    )


@dataclass(frozen=True)
class ServeOptions:
    """How the public side is served; the engine's settings are in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None  # None: no metrics endpoint
    log_interval: float = 0.0  # 0: no status lines
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        log_interval=args.log_interval,
        shutdown_timeout=args.shutdown_timeout,
    )


class SchedulerServer:
    """The engine plus the public gRPC server in front of it."""

    def __init__(self, config: EngineConfig, options: ServeOptions) -> None:
        self.options = options
        self.port = options.port
        self.metrics_port: int | None = None
        self.engine = Engine(config)
        self.engine.on_serving = self._on_serving
        # Without SO_REUSEPORT a second server on a port in use fails instead of sharing it.
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
        pbg.add_GenerationServicer_to_server(GenerationServicer(self.engine, config.model_name), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((GENERATION, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._status: asyncio.Task[None] | None = None
        self._health_sets: set[asyncio.Future[None]] = set()

    async def start(self) -> int:
        """Serves, connects to the workers, then reports SERVING; returns the bound port."""
        await self.listen()
        await self.connect()
        return self.port

    async def listen(self) -> int:
        """Opens the public port (and metrics) at once, so health checks see NOT_SERVING while workers load."""
        o = self.options
        for service in ("", GENERATION):
            await self.health.set(service, NOT_SERVING)
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert is None or o.tls_key is None:
                self.port = self.server.add_insecure_port(address)
            else:
                key_cert = (Path(o.tls_key).read_bytes(), Path(o.tls_cert).read_bytes())
                self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([key_cert]))
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: the port is in use or not this host's") from e
        await self.server.start()
        if o.metrics_port is not None:
            self.metrics_port = self.engine.metrics.serve(o.host, o.metrics_port)
        return self.port

    async def connect(self) -> None:
        await self.engine.start()
        if self.options.log_interval > 0:
            self._status = asyncio.create_task(StatusLog(self.engine, self.options.log_interval).run())
        for service in ("", GENERATION):
            await self.health.set(service, SERVING)

    def _on_serving(self, serving: bool) -> None:
        """NOT_SERVING while a worker rank is lost; ignored once draining (health stays NOT_SERVING)."""
        status = SERVING if serving else NOT_SERVING
        for service in ("", GENERATION):
            task = asyncio.ensure_future(self.health.set(service, status))
            self._health_sets.add(task)
            task.add_done_callback(self._health_sets.discard)

    async def drain(self, timeout: float, force: asyncio.Event | None = None) -> None:
        """NOT_SERVING from now on; refuses new requests and gives running ones `timeout` s to finish."""
        await self.health.enter_graceful_shutdown()
        await self.engine.drain(timeout, force)

    async def stop(self, grace: float = 1.0) -> None:
        if self._status is not None:
            self._status.cancel()
        await self.server.stop(grace)
        await self.engine.stop()
        self.engine.metrics.close()


class Shutdown:
    """The first SIGINT or SIGTERM asks for a drain; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()

    def signal(self) -> None:
        (self.forced if self.requested.is_set() else self.requested).set()

    def now(self) -> None:
        self.requested.set()
        self.forced.set()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.signal)


async def serve(config: EngineConfig, options: ServeOptions, shutdown: Shutdown | None = None) -> None:
    """Serves until shutdown is requested (SIGINT/SIGTERM when `shutdown` is None), then drains."""
    if shutdown is None:
        shutdown = Shutdown()
        shutdown.install()
    server = SchedulerServer(config, options)
    requested = asyncio.ensure_future(shutdown.requested.wait())
    try:
        await server.listen()
        connect = asyncio.ensure_future(server.connect())
        await asyncio.wait({connect, requested}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():  # asked to stop while the workers were still loading
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connect
            return
        connect.result()
        settle_heap()  # this process's own; library users of SchedulerServer keep their GC settings
        where = f"{options.host}:{server.port}"
        if server.metrics_port is not None:
            where += f" (metrics on http://{options.host}:{server.metrics_port}/metrics)"
        print(f"nanovllm scheduler ready on {where}", flush=True)
        dead = asyncio.ensure_future(server.engine.wait_dead())
        await asyncio.wait({dead, requested}, return_when=asyncio.FIRST_COMPLETED)
        if dead.done():  # exit non-zero, so that a supervisor (compose's restart policy) starts a fresh one
            raise WorkerUnavailable(f"the engine stopped: {dead.result()}")
        dead.cancel()
        running = len(server.engine.requests)
        log.info("draining: no new requests; up to %g s for the %d running", options.shutdown_timeout, running)
        await server.drain(options.shutdown_timeout, shutdown.forced)
    finally:
        requested.cancel()
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc", description="nanovllm scheduler service")
    add_args(p)
    p.add_argument("--workers", required=True, help="comma-separated worker addresses, rank 0 first")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(engine_config(args, args.workers.split(",")), serve_options(args)))
    except (WorkerUnavailable, OSError) as e:
        sys.exit(f"nanovllm scheduler: {e}")
