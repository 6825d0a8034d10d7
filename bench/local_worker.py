"""The worker without gRPC: the same Executor and model runner in this process, on a thread.

It has the scheduler-side WorkerGroup interface (connect, send, receive, wait, close, info), so the
in-process benchmark runs the very same engine loop as the service; only the transport differs.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from proto import worker_pb2 as wpb
from worker_svc.config import WorkerConfig
from worker_svc.executor import END, Executor, Ready
from worker_svc.model_runner import ModelRunner
from worker_svc.servicer import describe


class LocalWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.runner = ModelRunner(config)
        self.info: wpb.WorkerInfo | None = None
        self._requests: queue.Queue[wpb.StepRequest | Ready | None] = queue.Queue()
        self._results: asyncio.Queue[wpb.StepResult | BaseException] | None = None
        self._thread: threading.Thread | None = None

    async def connect(self, timeout: float) -> wpb.WorkerInfo:
        self.info = describe(self.runner, rank=0, world_size=1)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[wpb.StepResult | BaseException] = asyncio.Queue()
        self._results = results

        def serve() -> None:
            try:
                for res in Executor(self.runner, answer=True).run(self._requests):
                    loop.call_soon_threadsafe(results.put_nowait, res)
            except BaseException as e:
                loop.call_soon_threadsafe(results.put_nowait, e)

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        return self.info

    async def send(self, req: wpb.StepRequest) -> None:
        self._requests.put(req)

    async def receive(self) -> wpb.StepResult:
        assert self._results is not None
        item = await self._results.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait(self, wake: asyncio.Event) -> None:
        await wake.wait()  # an idle engine's wait; this worker cannot fail apart from the engine

    async def close(self, graceful: bool = False) -> None:
        self._requests.put(END)
        if self._thread is not None:
            self._thread.join(timeout=30)
