"""Where the standard workload's wall time goes on the device: every step of a real run, timed.

    PYTHONPATH=. python3 -m bench.timeline --model bench/qwen3-0.6b [--inproc] [--stream-interval N]
    PYTHONPATH=. python3 -m bench.timeline --model bench/qwen3-0.6b --kv-cache-dtype fp8
    PYTHONPATH=. python3 -m bench.timeline --model bench/qwen3-0.6b --single

Runs the throughput benchmark's workload once (bench/throughput.py), with the worker's
`ModelRunner.launch` wrapped to record a CUDA event before and after each step it queues. Full
stack (default): a worker process (`python -m worker_svc`, wrapped) and a scheduler process
(`python -m scheduler_svc`) joined by gRPC, and the benchmark's client; `--inproc`: the in-process
engine. Afterwards it prints, by kind of step (prefill or mixed, decode by batch size), the device
time the steps took, the time the device sat idle before them waiting for the host, and the KV
cache they read, so the run's wall time splits into attention-bound work, fixed per-step work
and host gaps. With --single the full stack serves the single-request benchmark instead (one
256-token prompt and 512 greedy tokens at a time, bench/throughput.py's `latency`): its decode
steps' idle time is what the host adds to each token beyond the device's step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.timing import copy_bandwidth
from bench.workload import Job
from worker_svc.config import KV_CACHE_DTYPES

KV_BYTES_PER_TOKEN = 28 * 2 * 8 * 128 * 2  # Qwen3-0.6B, bf16: layers x (K, V) x kv heads x head_dim
BUCKETS = ((0, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256))


@dataclass
class Step:
    seqs: int
    tokens: int
    decode: bool
    context: int  # tokens of KV the step's attention reads (every seq's length after the step)
    host_s: float  # host time of the launch call
    launched_at: float  # perf_counter at the call
    span_ms: float = 0.0  # device: this step's start event to its end event
    gap_ms: float = 0.0  # device idle between the previous step's end and this step's start


def install(steps: list[Step]) -> Callable[[], None]:
    """Wraps ModelRunner.launch to time each step; returns a function that resolves the events."""
    import torch

    from worker_svc.model_runner import ModelRunner, Pending
    from worker_svc.seq_state import SeqState

    launch = ModelRunner.launch
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(self: ModelRunner, seqs: list[SeqState], num_tokens: list[int]) -> Pending:
        t0 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = launch(self, seqs, num_tokens)
        end.record()
        context = sum(s.num_computed for s in seqs)  # launch has added num_tokens to each
        decode = all(n == 1 for n in num_tokens)
        steps.append(Step(len(seqs), sum(num_tokens), decode, context, time.perf_counter() - t0, t0))
        events.append((start, end))
        return pending

    ModelRunner.launch = timed

    def resolve() -> None:
        torch.cuda.synchronize()
        for i, (step, (start, end)) in enumerate(zip(steps, events, strict=True)):
            step.span_ms = start.elapsed_time(end)
            step.gap_ms = events[i - 1][1].elapsed_time(start) if i else 0.0

    return resolve


def workload_steps(steps: list[Step]) -> list[Step]:
    """The longest run of steps launched less than 0.5 s apart: the workload, not the warm-ups."""
    runs: list[list[Step]] = [[]]
    for prev, step in zip([None, *steps], steps, strict=False):
        if prev is not None and step.launched_at - prev.launched_at > 0.5:
            runs.append([])
        runs[-1].append(step)
    return max(runs, key=len)


def report(steps: list[Step], bandwidth: float, kv_bytes_per_token: int) -> None:
    steps = workload_steps(steps)
    steps[0].gap_ms = 0.0
    wall = sum(s.span_ms + s.gap_ms for s in steps) / 1e3
    print(f"\n{len(steps)} steps, {wall:.3f} s on the device clock from the first step's start to the last's end")
    print(f"KV floor: the decode steps' KV reads at {bandwidth / 1e12:.2f} TB/s")
    head = f"{'steps':>22} {'n':>5} {'device s':>9} {'idle s':>7} {'ms/step':>8} {'host ms':>8} {'KV GB':>7}"
    print(f"{head} {'KV floor s':>10} {'other ms/step':>13}")
    groups: list[tuple[str, list[Step]]] = [("prefill or mixed", [s for s in steps if not s.decode])]
    for lo, hi in BUCKETS:
        groups.append((f"decode, batch {lo}-{hi}", [s for s in steps if s.decode and lo <= s.seqs <= hi]))
    groups.append(("all", steps))
    for name, group in groups:
        if not group:
            continue
        n, device = len(group), sum(s.span_ms for s in group) / 1e3
        idle = sum(s.gap_ms for s in group) / 1e3
        kv = sum(s.context for s in group if s.decode) * kv_bytes_per_token
        floor = kv / bandwidth
        other = (device - floor) / n * 1e3 if kv else float("nan")
        host = sum(s.host_s for s in group) / n * 1e3
        print(
            f"{name:>22} {n:5d} {device:9.3f} {idle:7.3f} {device / n * 1e3:8.2f} {host:8.2f} {kv / n / 1e9:7.2f}"
            f" {floor:10.3f} {other:13.2f}"
        )


def as_worker(out: str, argv: list[str]) -> None:
    """`python -m worker_svc` with its steps timed; writes them to `out` when it stops."""
    from worker_svc import server

    steps: list[Step] = []
    resolve = install(steps)
    try:
        server.main(argv)
    finally:
        resolve()
        Path(out).write_text(json.dumps({"bandwidth": copy_bandwidth(), "steps": [asdict(s) for s in steps]}))


def full_stack(args: argparse.Namespace, model: str, jobs: list[Job]) -> None:
    from bench import throughput

    out = Path("/tmp/nanovllm-timeline.json")
    out.unlink(missing_ok=True)
    common = ["--model", model, "--max-num-seqs", "256", "--max-model-len", str(args.max_model_len)]
    common += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    worker_flags = ["--load-format", "dummy", "--port", "50261", "--gpu-memory-utilization", "0.9"]
    worker_flags += ["--kv-cache-dtype", args.kv_cache_dtype]
    worker_cmd = [sys.executable, "-m", "bench.timeline", "--as-worker", str(out), "--", *common, *worker_flags]
    sched_flags = ["--workers", "127.0.0.1:50261", "--port", "50251", "--stream-interval", str(args.stream_interval)]
    sched_cmd = [sys.executable, "-m", "scheduler_svc", *common, *sched_flags]
    # The worker writes its steps to `out` as it stops, on leaving this block.
    with throughput.worker_and_scheduler(worker_cmd, sched_cmd):
        if args.single:
            print(f"single request: {asyncio.run(throughput.latency('127.0.0.1:50251'))}", flush=True)
        else:
            n, secs = asyncio.run(throughput.full_stack("127.0.0.1:50251", jobs))
            print(f"full stack: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)
    data = json.loads(out.read_text())
    report([Step(**s) for s in data["steps"]], data["bandwidth"], kv_bytes_per_token(args))


def kv_bytes_per_token(args: argparse.Namespace) -> int:
    return KV_BYTES_PER_TOKEN // 2 if args.kv_cache_dtype == "fp8" else KV_BYTES_PER_TOKEN


def in_process(args: argparse.Namespace, model: str, jobs: list[Job]) -> None:
    from bench import throughput

    steps: list[Step] = []
    resolve = install(steps)
    flags = ["--model", args.model, "--stream-interval", str(args.stream_interval)]
    flags += ["--kv-cache-dtype", args.kv_cache_dtype]
    flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len)]
    bench_args = throughput.parse_args(flags)
    n, secs = asyncio.run(throughput.in_process(bench_args, model, jobs))
    print(f"in-process: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)
    resolve()
    report(steps, copy_bandwidth(), kv_bytes_per_token(args))


def main() -> None:
    if sys.argv[1:2] == ["--as-worker"]:
        as_worker(sys.argv[2], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--inproc", action="store_true", help="the in-process engine instead of the full stack")
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="as bench/throughput.py")
    p.add_argument("--single", action="store_true", help="one request at a time (full stack only)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    args = p.parse_args()
    if args.single and args.inproc:
        p.error("--single runs the full stack only")
    from bench import throughput
    from bench.workload import standard

    model = throughput.model_dir(argparse.Namespace(model=args.model))
    (in_process if args.inproc else full_stack)(args, model, standard())


if __name__ == "__main__":
    main()
