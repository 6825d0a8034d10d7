"""Runs the scheduler: the public gRPC server (Generation, health, reflection) in front of one engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg

from nanovllm_grpc import __version__
from nanovllm_grpc.process import settle_heap
from nanovllm_grpc.settings import add_flags, build
from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pbg
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.interceptor import ErrorInterceptor
from scheduler_svc.servicer import GenerationServicer
from scheduler_svc.status import StatusLog
from scheduler_svc.vllm_servicer import VllmEngineServicer

log = logging.getLogger("scheduler")

GENERATION = pb.DESCRIPTOR.services_by_name["Generation"].full_name
VLLM_ENGINE = vpb.DESCRIPTOR.services_by_name["VllmEngine"].full_name  # what gateways such as SMG speak
HEALTH_NAMES = ("", GENERATION, VLLM_ENGINE)  # the server as a whole and each API it serves
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SchedulerServer:
    """The engine plus the public gRPC server in front of it."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.port = config.port
        self.metrics_port: int | None = None
        self.engine = Engine(config)
        self.engine.on_serving = self._on_serving
        # Without SO_REUSEPORT a second server on a port in use fails instead of sharing it.
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
        pbg.add_GenerationServicer_to_server(GenerationServicer(self.engine, config.model_name), self.server)
        vpbg.add_VllmEngineServicer_to_server(VllmEngineServicer(self.engine), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (GENERATION, VLLM_ENGINE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)
        self._status: asyncio.Task[None] | None = None
        self._health_sets: set[asyncio.Future[None]] = set()

    async def start(self) -> int:
        """Serves, connects to the workers, then reports SERVING; returns the bound port."""
        await self.listen()
        await self.connect()
        return self.port

    async def listen(self) -> int:
        """Opens the public port (and metrics) at once, so health checks see NOT_SERVING while workers load."""
        cfg = self.config
        for service in HEALTH_NAMES:
            await self.health.set(service, NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert is None or cfg.tls_key is None:
                self.port = self.server.add_insecure_port(address)
            else:
                key_cert = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
                self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([key_cert]))
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: the port is in use or not this host's") from e
        await self.server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.engine.metrics.serve(cfg.host, cfg.metrics_port)
        return self.port

    async def connect(self) -> None:
        await self.engine.start()
        if self.config.log_interval > 0:
            self._status = asyncio.create_task(
                StatusLog(self.engine.metrics, self.engine.load, self.config.log_interval).run()
            )
        for service in HEALTH_NAMES:
            await self.health.set(service, SERVING)

    def _on_serving(self, serving: bool) -> None:
        """NOT_SERVING while a worker rank is lost; ignored once draining (health stays NOT_SERVING)."""
        status = SERVING if serving else NOT_SERVING
        for service in HEALTH_NAMES:
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


async def serve(config: SchedulerConfig, shutdown: Shutdown | None = None) -> None:
    """Serves until shutdown is requested (SIGINT/SIGTERM when `shutdown` is None), then drains."""
    if shutdown is None:
        shutdown = Shutdown()
        shutdown.install()
    server = SchedulerServer(config)
    requested = asyncio.ensure_future(shutdown.requested.wait())
    started = time.monotonic()
    try:
        await server.listen()
        log.info("nanovllm-grpc %s scheduler for %s on %s:%d", __version__, config.model, config.host, server.port)
        connect = asyncio.ensure_future(server.connect())
        await asyncio.wait({connect, requested}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():  # asked to stop while the workers were still loading
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connect
            return
        connect.result()
        settle_heap()  # this process's own; library users of SchedulerServer keep their GC settings
        info = server.engine.info
        assert info is not None
        log.info(
            "model %r: max model len %d, KV cache %d blocks of %d = %d tokens over %d rank(s); ready in %.1f s",
            config.model_name, info.max_model_len, info.num_blocks, info.block_size,
            info.num_blocks * info.block_size, info.world_size, time.monotonic() - started,
        )  # fmt: skip
        where = f"{config.host}:{server.port}"
        if server.metrics_port is not None:
            where += f" (metrics on http://{config.host}:{server.metrics_port}/metrics)"
        print(f"nanovllm scheduler ready on {where}", flush=True)
        dead = asyncio.ensure_future(server.engine.wait_dead())
        await asyncio.wait({dead, requested}, return_when=asyncio.FIRST_COMPLETED)
        if dead.done():  # exit non-zero, so that a supervisor (compose's restart policy) starts a fresh one
            raise WorkerUnavailable(f"the engine stopped: {dead.result()}")
        dead.cancel()
        running = len(server.engine.requests)
        log.info("draining: no new requests; up to %g s for the %d running", config.shutdown_timeout, running)
        await server.drain(config.shutdown_timeout, shutdown.forced)
    finally:
        requested.cancel()
        await server.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc", description="nanovllm scheduler service")
    add_flags(p, SchedulerConfig, "scheduler")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    try:
        config: SchedulerConfig = build(SchedulerConfig, vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(config))
    except (WorkerUnavailable, OSError) as e:  # OSError: a port it cannot take
        sys.exit(f"nanovllm scheduler: {e}")
