"""The scheduler's own ceiling: the standard workload against a worker that answers instantly.

    python -m bench.host_overhead --model DIR [--grpc] [--profile out.prof]
    python -m bench.host_overhead --model DIR --step-ms 4 --online 8      (bench.serve against it)

No model runs: each step is answered at once with arbitrary tokens, so the output tokens/s is what
the engine (scheduling, protobufs, detokenization, streaming) could sustain if the GPU took no time.
With --grpc the engine sits behind the public gRPC server in a child process and the benchmark's
client streams from it, as in the full-stack benchmark: the ceiling of one scheduler process. In
both modes the engine core runs in the engine's own event loop (as with `--no-core-process`):
the instant worker is an object of that process, which a separate core process could not reach.
It runs on any machine; compare it with the GPU's step time to see whether the host keeps up.
With --online RATES the gRPC server is driven by bench/serve.py instead (Poisson arrivals, streamed):
the inter-token gaps the host alone adds, with every step taking --step-ms.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import signal
import subprocess
import sys
import time

from bench.throughput import consume, full_stack, model_dir
from bench.timing import cpu_seconds
from bench.workload import standard
from proto import worker_pb2 as wpb
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.server import SchedulerServer


class InstantWorker:
    """The WorkerGroup interface; every sampling seq gets token (step + seq) % 10000. With
    `step_s` > 0 it plays a device that runs one step at a time for that long each: a step's result
    is ready step_s after the later of its arrival and the previous step's end."""

    def __init__(self, num_blocks: int, step_s: float = 0.0) -> None:
        self.info = wpb.WorkerInfo(
            rank=0, world_size=1, num_kv_blocks=num_blocks, block_size=16, max_model_len=4096,
            vocab_size=151936, max_num_seqs=256, max_num_batched_tokens=8192, ready=True,
        )  # fmt: skip
        self.pending: list[tuple[wpb.StepRequest, float]] = []  # with the time its result is ready
        self.todo: dict[int, int] = {}  # seq id -> tokens left before it samples
        self.step_s = step_s
        self.device_free = 0.0

    async def connect(self, timeout: float) -> wpb.WorkerInfo:
        return self.info

    async def send(self, req: wpb.StepRequest) -> None:
        self.device_free = max(time.perf_counter(), self.device_free) + self.step_s
        self.pending.append((wpb.StepRequest.FromString(req.SerializeToString()), self.device_free))

    async def receive(self) -> wpb.StepResult:
        req, ready = self.pending.pop(0)
        if (wait := ready - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        for s in req.removed:
            self.todo.pop(s, None)
        for a in req.added:
            self.todo[a.seq_id] = len(a.token_ids) - a.num_computed_tokens
        res = wpb.StepResult(step_id=req.step_id)
        for s, n in zip(req.seq_ids, req.num_tokens, strict=True):
            self.todo[s] -= n
            if self.todo[s] <= 0:
                self.todo[s] = 1
                res.seq_ids.append(s)
                res.token_ids.append((req.step_id + s) % 10000)
        await asyncio.sleep(0)
        return wpb.StepResult.FromString(res.SerializeToString())

    async def wait(self, wake: asyncio.Event) -> None:
        await wake.wait()  # an idle engine's wait; this worker cannot fail apart from the engine

    async def close(self, graceful: bool = False) -> None:
        return None


async def run(model: str, step_s: float) -> tuple[int, float]:
    config = SchedulerConfig(model=model, workers=("instant",), core_process=False)
    engine = Engine(config, workers=InstantWorker(40_000, step_s))  # type: ignore[arg-type]
    await engine.start()
    jobs = standard()
    start = time.perf_counter()
    params = [SamplingParams(max_tokens=j.max_tokens, ignore_eos=True, temperature=0.6) for j in jobs]
    streams = [engine.generate(f"r{i}", j.prompt, p) for i, (j, p) in enumerate(zip(jobs, params, strict=True))]
    counts = await asyncio.gather(*(consume(s) for s in streams))
    elapsed = time.perf_counter() - start
    await engine.stop()
    return sum(c for c, _ in counts), elapsed


def serve(model: str, step_s: float, interval: int, port: multiprocessing.Value, profile: str | None) -> None:  # type: ignore[valid-type]
    """Child process: the public gRPC server over an engine whose worker answers instantly."""

    async def run() -> None:
        config = SchedulerConfig(
            model=model, workers=("instant",), port=0, stream_interval=interval, core_process=False
        )
        server = SchedulerServer(config)
        server.engine.core.workers = InstantWorker(40_000, step_s)  # type: ignore[assignment]
        port.value = await server.start()
        await server.server.wait_for_termination()

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: the profile gets saved
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(profile)


def through_grpc(
    model: str, step_s: float, interval: int, profile: str | None, online: str | None = None
) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")  # no forked copy of this process's gRPC state
    port = ctx.Value("i", 0)
    child = ctx.Process(target=serve, args=(model, step_s, interval, port, profile))
    child.start()
    try:
        while not port.value:
            if not child.is_alive():
                raise SystemExit("the scheduler process died")
            time.sleep(0.1)
        if online is not None:
            cmd = [sys.executable, "-m", "bench.serve", "--addr", f"127.0.0.1:{port.value}", "--rates", online]
            subprocess.run(cmd, check=True)
            return 0, 0.0
        before = cpu_seconds(child.pid), time.process_time()
        n, secs = asyncio.run(full_stack(f"127.0.0.1:{port.value}", standard()))
        server, client = cpu_seconds(child.pid) - before[0], time.process_time() - before[1]
        print(f"CPU busy (of one core): scheduler process {server / secs:.0%}, client {client / secs:.0%}")
        return n, secs
    finally:
        child.terminate()  # SIGTERM: its profile, if any, is written on the way out
        child.join(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--profile", default=None, help="write a cProfile of the engine's process here")
    p.add_argument("--grpc", action="store_true", help="behind the gRPC server, in a process of its own")
    p.add_argument("--step-ms", type=float, default=0.0, help="play a device taking this long per step")
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed message (with --grpc)")
    p.add_argument("--online", default=None, help="request rates for bench/serve.py against the gRPC server")
    args = p.parse_args()
    args.load_format = "dummy"
    model = model_dir(args)
    if args.online:
        through_grpc(model, args.step_ms / 1e3, args.stream_interval, args.profile, args.online)
        return
    if args.grpc:
        n, secs = through_grpc(model, args.step_ms / 1e3, args.stream_interval, args.profile)
        print(f"scheduler process behind gRPC: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s")
        return
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    n, secs = asyncio.run(run(model, args.step_ms / 1e3))
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    print(f"engine alone: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
