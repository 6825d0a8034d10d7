"""Chaos: the standard workload while the worker is SIGKILLed N times at random, restarted at once
as a supervisor would. The scheduler holds every request and recomputes the lost KV, so no request
may be lost and, with seeded sampling, every output must equal the fault-free run's.

    python -m bench.chaos                      # CPU: a tiny random model, 32 requests
    python -m bench.chaos --model bench/qwen3-0.6b --device cuda --requests 256 --kills 3

Prints requests lost (failed, or not exactly max_tokens long), requests whose tokens differ from the
fault-free run's, the tokens recomputed and the wall time the faults added. On a GPU a request's
logits depend a little on which requests share its steps, and the timing of a run decides that, so
two fault-free runs already differ in some sampled tokens: the fault-free run is made twice and that
count is printed beside the faulted one. Where two fault-free runs agree (the CPU), a faulted run
must agree too. The scheduler and the worker are processes of their own (the
scheduler's metrics endpoint gives the recovery counts); the client is this process.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.throughput import TEMPERATURE, model_dir
from bench.workload import Job, standard
from client import AsyncClient
from nanovllm_grpc.launch import free_port


class Stack:
    """A worker process (killed and restarted here) and a scheduler process in front of it."""

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        self.port, self.metrics_port, worker_port = free_port(), free_port(), free_port()
        self.worker_cmd = [sys.executable, "-m", "worker_svc", "--model", model, "--port", str(worker_port)]
        self.worker_cmd += ["--load-format", args.load_format, "--device", args.device, "--dtype", args.dtype]
        if args.num_kvcache_blocks:
            self.worker_cmd += ["--num-kvcache-blocks", str(args.num_kvcache_blocks)]
        self.worker = subprocess.Popen(self.worker_cmd)
        cmd = [sys.executable, "-m", "scheduler_svc", "--model", model, "--port", str(self.port)]
        cmd += ["--workers", f"127.0.0.1:{worker_port}", "--metrics-port", str(self.metrics_port)]
        cmd += ["--worker-recovery-timeout", str(args.recovery_timeout), "--log-interval", "0"]
        self.scheduler = subprocess.Popen(cmd)
        self.addr = f"127.0.0.1:{self.port}"

    def kill_worker(self) -> None:
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait()
        self.worker = subprocess.Popen(self.worker_cmd)

    async def serving(self, timeout: float) -> None:
        async with grpc.aio.insecure_channel(self.addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    res = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if res.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"the scheduler was not SERVING within {timeout:g} s")

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^(nanovllm_\w+) (\S+)$", text, re.M)}

    def restarts(self) -> float:
        return self.metrics().get("nanovllm_worker_restarts_total", 0.0)

    def stop(self) -> None:
        for proc in (self.scheduler, self.worker):
            proc.terminate()
        for proc in (self.scheduler, self.worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def jobs_for(args: argparse.Namespace, vocab: int, max_len: int) -> list[Job]:
    """The standard workload; on a short-context model, prompts and outputs cut to fit."""
    half = max_len // 2
    return [Job([t % vocab for t in j.prompt[:half]], min(j.max_tokens, half)) for j in standard(args.requests)]


async def run(stack: Stack, jobs: list[Job], kills: list[float]) -> tuple[list[list[int] | str], float]:
    """Every job at once; the worker is killed `kills` seconds after the start (each once the group
    is back from the previous kill). Returns each job's tokens (or its error) and the wall time."""
    async with AsyncClient(stack.addr) as client:

        async def one(i: int, job: Job) -> list[int] | str:
            sampling = {"temperature": TEMPERATURE, "seed": i, "ignore_eos": True}
            try:
                return [
                    t
                    async for m in client.generate(job.prompt, max_tokens=job.max_tokens, **sampling)
                    for t in m.token_ids
                ]
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"

        async def chaos() -> None:
            for at in kills:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
                restarts = await asyncio.to_thread(stack.restarts)
                stack.kill_worker()
                print(f"chaos: killed the worker at {time.perf_counter() - start:.1f} s", file=sys.stderr)
                while await asyncio.to_thread(stack.restarts) == restarts:  # until the scheduler has it back
                    await asyncio.sleep(0.1)

        start = time.perf_counter()
        killer = asyncio.create_task(chaos())
        outs = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        wall = time.perf_counter() - start
        killer.cancel()
        return outs, wall


async def main_async(args: argparse.Namespace) -> None:
    model = model_dir(args)
    stack = Stack(args, model)
    try:
        await stack.serving(900)
        async with AsyncClient(stack.addr) as c:
            info = await c.model_info()
            async for _ in c.generate([1, 2, 3], max_tokens=4):  # warm-up
                pass
        jobs = jobs_for(args, info.vocab_size, info.max_model_len)
        reference, base = await run(stack, jobs, [])
        assert all(isinstance(r, list) for r in reference), [r for r in reference if isinstance(r, str)][:3]
        control, _ = await run(stack, jobs, [])
        noise = sum(c != r for c, r in zip(control, reference, strict=True))
        rng = random.Random(args.seed)
        kills = sorted(rng.uniform(0.05, 0.8) * base for _ in range(args.kills))
        before = stack.metrics()
        outs, wall = await run(stack, jobs, kills)
        after = stack.metrics()
        lost = sum(isinstance(o, str) or len(o) != j.max_tokens for o, j in zip(outs, jobs, strict=True))
        differ = sum(o != r for o, r in zip(outs, reference, strict=True))
        for o in outs:
            if isinstance(o, str):
                print(f"chaos: a request failed: {o}", file=sys.stderr)

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        print(f"requests: {len(jobs)}, output tokens: {sum(j.max_tokens for j in jobs)}, kills: {args.kills}")
        print(f"requests lost: {lost} (failed, or not max_tokens long)")
        print(f"requests whose tokens differ from the fault-free run: {differ} (two fault-free runs: {noise})")
        print(f"worker restarts seen by the scheduler: {delta('nanovllm_worker_restarts_total'):.0f}")
        print(f"requests resumed: {delta('nanovllm_requests_resumed_total'):.0f}")
        print(f"tokens recomputed: {delta('nanovllm_tokens_recomputed_total'):.0f}")
        print(f"seconds in recovery: {delta('nanovllm_worker_recovery_seconds_total'):.1f}")
        print(f"wall: {base:.1f} s fault-free, {wall:.1f} s with faults, added {wall - base:.1f} s")
        if lost or (differ and not noise):
            sys.exit(1)
    finally:
        stack.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=str(Path(__file__).parent / "qwen3-tiny"), help="model dir, or a config.json's dir"
    )
    p.add_argument("--load-format", default="dummy", choices=("auto", "dummy"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-kvcache-blocks", type=int, default=None)
    p.add_argument("--requests", type=int, default=32, help="of the standard workload (256: all of it)")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="of the kill times")
    p.add_argument("--recovery-timeout", type=float, default=600.0)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
