"""Runs the whole service in this process for end-to-end tests: a worker gRPC server on its own
threads and the scheduler's asyncio gRPC server on a background event loop. Real gRPC on
loopback, real protobufs, the real model runner; only the process boundary is left out."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from nanovllm_grpc.settings import build
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.server import SchedulerServer
from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.server import WorkerServer
from worker_svc.servicer import WorkerServicer

T = TypeVar("T")


def start_worker(model_dir: str, ready: bool = True, **worker: object) -> WorkerServer:
    """A rank-0 worker on a free loopback port; `ready=False` leaves it loading (NOT_SERVING)."""
    server = WorkerServer(WorkerServicer(rank=0, world_size=1, device="cpu"), "127.0.0.1", 0)
    if ready:
        load(server, model_dir, **worker)
    return server


def load(server: WorkerServer, model_dir: str, **worker: object) -> None:
    server.ready(ModelRunner(WorkerConfig(model=str(model_dir), device="cpu", dtype="float32", **worker)))


class Loop:
    """An asyncio event loop on a daemon thread, for servers that the test's thread calls into."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result(timeout=120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def make_server(config: SchedulerConfig) -> SchedulerServer:
    return SchedulerServer(config)  # built on the loop: its asyncio objects belong there


def scheduler_config(model_dir: str, worker_port: int, **settings: object) -> SchedulerConfig:
    """A scheduler on a free loopback port, its core in this process and no status lines, unless
    `settings` (SchedulerConfig's, by flat name) say otherwise."""
    defaults = {"port": 0, "log_interval": 0.0, "core_process": False}
    return build(
        SchedulerConfig, {**defaults, "model": str(model_dir), "workers": (f"127.0.0.1:{worker_port}",), **settings}
    )


class Service:
    """`scheduler`: SchedulerConfig settings by flat name (see scheduler_config); the rest: WorkerConfig's.
    The engine core runs in this process unless `scheduler` sets core_process, so tests can look at
    its scheduler."""

    def __init__(self, model_dir: str, scheduler: dict | None = None, **worker: object) -> None:
        self.worker = start_worker(model_dir, **worker)
        config = scheduler_config(model_dir, self.worker.port, **(scheduler or {}))
        self.loop = Loop()
        self.server = self.loop.call(make_server(config))
        port = self.loop.call(self.server.start())
        self.addr = f"127.0.0.1:{port}"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.call(coro)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def stop(self) -> None:
        self.call(self.server.stop(grace=0))
        self.loop.close()
        self.worker.stop(grace=0)
