"""Helpers for the fault tests: a worker in a process of its own (so that it can be killed, stopped
or restarted on the same port, as compose would), concurrent streams with a hook that fires once
enough tokens have streamed, and polls with a deadline."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AsyncClient
from tests.polling import OutputProcess, free_port

Job = tuple[list[int], dict]  # a prompt and the sampling settings of one request


class WorkerProcess:
    """`python -m worker_svc` on CPU with the tiny model; `start()` again restarts it on the same port."""

    def __init__(self, model_dir: str | Path, num_kv_blocks: int = 256) -> None:
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "worker_svc", "--model", str(model_dir), "--port", str(self.port)]
        self.cmd += ["--device", "cpu", "--dtype", "float32", "--num-kvcache-blocks", str(num_kv_blocks)]
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


async def _stream(client: AsyncClient, job: Job, tick: Callable[[int], None]) -> list[int] | grpc.aio.AioRpcError:
    tokens: list[int] = []
    try:
        async for msg in client.generate(job[0], **job[1]):
            tokens += msg.token_ids
            tick(len(msg.token_ids))
    except grpc.aio.AioRpcError as e:
        return e
    return tokens


def run_streams(
    addr: str, jobs: list[Job], hooks: dict[int, Callable[[], None]] | None = None, timeout: float = 120
) -> list[list[int] | grpc.aio.AioRpcError]:
    """Streams every job at once; calls hooks[n] (once) when n tokens have streamed in all.
    Returns each job's tokens, or the error that ended it."""
    streamed = 0

    def tick(n: int) -> None:
        nonlocal streamed
        before, streamed = streamed, streamed + n
        for after, hook in (hooks or {}).items():
            if before < after <= streamed:
                hook()

    async def main() -> list[list[int] | grpc.aio.AioRpcError]:
        async with AsyncClient(addr) as client:
            calls = (_stream(client, job, tick) for job in jobs)
            return await asyncio.wait_for(asyncio.gather(*calls), timeout)

    return asyncio.run(main())


def health(addr: str) -> int:
    """The server's overall health status (health_pb2.HealthCheckResponse.ServingStatus), -1 if it does not answer."""
    with grpc.insecure_channel(addr) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Polls `check` until it holds; returns the seconds it took, fails past `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - start


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def children(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        found |= kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServeProcess(OutputProcess):
    """`nanovllm serve` on CPU with the tiny model; its output lines are kept in `lines`."""

    def __init__(self, model_dir: str | Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-c", "from nanovllm_grpc.cli import main; main()", "serve", "--model", str(model_dir)]
        cmd += ["--port", str(self.port), "--device", "cpu", "--dtype", "float32", *flags]
        super().__init__(cmd, env)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        self.wait_for("scheduler ready")

    def metrics(self) -> dict[str, float]:
        """The scheduler's Prometheus metrics (serve with --metrics-port), by name."""
        url = next(m[1] for line in self.lines if (m := re.search(r"metrics on (http://\S+/metrics)", line)))
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^(nanovllm_\w+) (\S+)$", text, re.M)}

    def worker_pids(self) -> list[int]:
        """Each worker process started so far, from its ready line."""
        return [
            int(m.group(1)) for line in self.lines if (m := re.search(r"worker rank \d+ ready .*\(pid (\d+)\)", line))
        ]
