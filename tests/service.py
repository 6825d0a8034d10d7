"""Runs the whole service in this process for end-to-end tests: a worker gRPC server on its own
threads and the scheduler's asyncio gRPC server on a background event loop. Real gRPC on
loopback, real protobufs, the real model runner; only the process boundary is left out."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc

from proto import worker_pb2_grpc as wgrpc
from scheduler_svc.engine import Engine, EngineConfig
from scheduler_svc.server import SchedulerServer
from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.servicer import WorkerServicer


def start_worker(model_dir: str, **worker: object) -> tuple[grpc.Server, str]:
    config = WorkerConfig(model=str(model_dir), device="cpu", dtype="float32", **worker)
    servicer = WorkerServicer(rank=0, world_size=1, device="cpu")
    servicer.runner = ModelRunner(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    wgrpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class Service:
    def __init__(self, model_dir: str, engine: dict | None = None, **worker: object) -> None:
        self.worker, worker_addr = start_worker(model_dir, **worker)
        config = EngineConfig(model=str(model_dir), worker_addresses=(worker_addr,), **(engine or {}))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(config))
        port = self.call(self.server.start())
        self.addr = f"127.0.0.1:{port}"

    @staticmethod
    async def _make(config: EngineConfig) -> SchedulerServer:
        return SchedulerServer(config, "127.0.0.1", 0)

    def call(self, coro):  # runs a coroutine on the service's loop and waits for it
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def stop(self) -> None:
        self.call(self.server.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.worker.stop(grace=0)
