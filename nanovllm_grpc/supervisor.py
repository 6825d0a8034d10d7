"""`nanovllm serve`'s worker processes: started to die with it, and restarted when one exits.

The scheduler holds every request while a worker is gone and resumes them when it is back, so a
crashed worker costs a pause. Ranks of one tensor-parallel group share collectives, so when any rank
exits the whole group restarts. Restarts are bounded: a group that never became ready (a bad flag)
or keeps dying (no memory) is given up, and `serve` stops rather than loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanovllm_grpc.process import die_with_parent

MAX_RESTARTS = 5  # in RESTART_WINDOW seconds
RESTART_WINDOW = 300.0


class WorkerProcesses:
    def __init__(self, cmds: list[list[str]], addresses: list[str]) -> None:
        self.cmds = cmds
        self.addresses = addresses
        self.was_ready = False  # every rank has served once: a later exit is a crash worth a restart
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts: deque[float] = deque()

    def start(self) -> None:
        """Call it from the main thread: Linux kills the children when the thread that forked them ends."""
        parent = os.getpid()
        self.procs = [subprocess.Popen(c, preexec_fn=lambda: die_with_parent(parent)) for c in self.cmds]

    async def supervise(self, stopping: Callable[[], bool]) -> None:
        """Restarts the group whenever a rank exits; returns when one exits while `stopping()`, or when
        the group has already been restarted MAX_RESTARTS times in the window."""
        while True:
            while all(p.poll() is None for p in self.procs):
                self.was_ready = self.was_ready or await self._ready()
                await asyncio.sleep(0.2)
            if stopping():
                return
            rank, code = next((r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None)
            if not self.was_ready:
                print(f"nanovllm: worker rank {rank} exited with code {code} before it was ready", file=sys.stderr)
                return
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
                self.restarts.popleft()
            if len(self.restarts) >= MAX_RESTARTS:
                print(
                    f"nanovllm: worker rank {rank} exited with code {code}, after {MAX_RESTARTS} restarts in "
                    f"{RESTART_WINDOW:g} s: giving up",
                    file=sys.stderr,
                    flush=True,
                )
                return
            self.restarts.append(now)
            print(
                f"nanovllm: worker rank {rank} exited with code {code}; restarting the workers",
                file=sys.stderr,
                flush=True,
            )
            self.stop(grace=0.0)
            self.start()

    async def _ready(self) -> bool:
        for addr in self.addresses:
            async with grpc.aio.insecure_channel(addr) as ch:
                try:
                    res = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                if res.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
        return True

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None and grace:
                p.terminate()
            elif p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=grace or None)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failed(self) -> bool:
        """Whether a worker ended with an error (a clean exit or our SIGTERM is not one)."""
        return any(p.poll() not in (None, 0, -signal.SIGTERM) for p in self.procs)
