"""Where a decode step's time goes: one batch of the standard workload's shape, profiled.

    PYTHONPATH=. python3 bench/profile_step.py [--batch 256[,64,1]] [--context 1024] [--tp 2] [--compile] [--trace F]

Builds the worker's ModelRunner on dummy Qwen3-0.6B weights (with --compile, its torch.compile
regions in place of our fused kernels), and for each batch size puts `batch` sequences of `context`
tokens in the cache, then times decode steps (CUDA graphs, as served) two ways: back to back with
the next step launched before the last is read (the host's share hidden, unless its launch takes
as long as the step: that time is printed too), and one at a time (host + device), with a cProfile
of the host's share. A torch profile of a few steps splits device time into attention, matmuls,
sampling and the rest. The floor is the KV cache and weights read once per step at the measured
copy bandwidth. With --tp N it runs one process per GPU, joined by NCCL as the workers are, and
rank 0 reports (its shares of the weights and the KV cache). --trace F writes every kernel and copy of
six pipelined steps to F.b<batch>, one a line: where a step's edges and kernel boundaries go.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch
import torch.multiprocessing as mp

from bench.timing import copy_bandwidth, top_kernels
from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.seq_state import SamplingOptions, SeqState
from worker_svc.server import init_distributed


def category(name: str) -> str:
    n = name.lower()
    if n.startswith(("triton_poi_", "triton_red_", "triton_per_")):  # inductor's, with --compile
        return "torch.compile's fused kernels (norms, rotary, silu, adds)"
    if "decode" in n or "prefill" in n or "store_kvcache" in n:
        return "attention (triton)"
    if "nccl" in n:
        return "all-reduces and the sampling exchange (NCCL)"
    if "gemm" in n or "matmul" in n or "nvjet" in n or "cutlass" in n or "sm90" in n or "gemv" in n:
        return "matmuls (cuBLAS; one or two rows: Triton GEMV + its norm/SiLU)"
    if any(k in n for k in ("sample", "merge_kernel", "softmax", "argmax", "div", "clamp", "reduce")):
        return "sampling and reductions"
    if "memcpy" in n or "copy" in n:
        return "copies"
    return "other elementwise (norms, rotary, silu, adds)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--batch", default="256", help="batch sizes, comma-separated: one runner profiles each")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: one process per GPU")
    p.add_argument("--top", type=int, default=0, help="also list the N kernels that take the most time")
    p.add_argument("--compile", action="store_true", help="the worker's --compile")
    p.add_argument("--prefill-graph-tokens", type=int, default=2048, help="the worker's setting")
    p.add_argument("--trace", help="write the device's events of a few pipelined steps to this file, one a line")
    args = p.parse_args()
    if args.tp == 1:
        profile(0, args)
    else:
        mp.spawn(profile, args=(args,), nprocs=args.tp)


def profile(rank: int, args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batch.split(",")]
    blocks_per = -(-(args.context + 3 * args.steps + 10) // 16)  # three timed runs of `steps` decodes
    config = WorkerConfig(
        args.model, load_format="dummy", device="cuda", max_model_len=4096, num_kv_blocks=max(batches) * blocks_per,
        tensor_parallel_size=args.tp, compile=args.compile, prefill_graph_tokens=args.prefill_graph_tokens,
    )  # fmt: skip
    if args.tp > 1:
        init_distributed(config, rank, "127.0.0.1", 29517)
    start = time.perf_counter()
    runner = ModelRunner(config, rank, args.tp)
    if rank == 0:
        print(f"rank 0 of {args.tp}: model runner built in {time.perf_counter() - start:.1f} s", flush=True)
    for bs in batches:
        profile_batch(runner, rank, bs, blocks_per, args)
    if rank == 0 and args.compile:
        print(f"torch.compile graphs compiled after start-up: {runner.graph_compiles.count}")


def profile_batch(runner: ModelRunner, rank: int, bs: int, blocks_per: int, args: argparse.Namespace) -> None:
    ctx = args.context
    opts = SamplingOptions(temperature=0.6)
    seqs = [SeqState(i, [1] * ctx, ctx, 0, list(range(i * blocks_per, (i + 1) * blocks_per)), opts) for i in range(bs)]
    for i in range(0, bs, 8):  # prefill in groups to bound activation memory
        runner.run(seqs[i : i + 8], [ctx] * len(seqs[i : i + 8]))
    one = [1] * bs

    torch.cuda.synchronize()
    t, launching = time.perf_counter(), 0.0
    pending = runner.launch(seqs, one)
    for _ in range(args.steps - 1):
        start = time.perf_counter()
        nxt = runner.launch(seqs, one)
        launching += time.perf_counter() - start
        runner.collect(pending)
        pending = nxt
    runner.collect(pending)
    overlapped = (time.perf_counter() - t) / args.steps
    launch = launching / (args.steps - 1)  # near `overlapped`: the host, not the device, sets the pace
    t = time.perf_counter()
    for _ in range(args.steps):
        runner.run(seqs, one)
    serial = (time.perf_counter() - t) / args.steps

    host = cProfile.Profile()  # where the host's share of a step goes (hidden when steps overlap)
    host.enable()
    for _ in range(10):
        runner.run(seqs, one)
    host.disable()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.run(seqs, one)
    by_cat: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        by_cat[category(ev.key)] += ev.device_time_total / 5 / 1e3  # ms per step
    device = sum(by_cat.values())

    bandwidth = copy_bandwidth()
    mean_ctx = ctx + args.steps * 2.5  # the profiled steps come after two runs of `steps`
    kv = bs * mean_ctx * runner.kv_cache[0, 0, 0, 0].numel() * 2 * runner.kv_cache.shape[1] * runner.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    floor = (kv + weights) / bandwidth
    if args.trace and rank == 0:
        trace(runner, seqs, f"{args.trace}.b{bs}")
    for seq in seqs:
        runner.release(seq)
    if rank:
        return
    print(f"\nbatch {bs}, context ~{mean_ctx:.0f}: KV read {kv / 1e9:.2f} GB + weights {weights / 1e9:.2f} GB per step")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s -> floor {1e3 * floor:.2f} ms/step")
    print(f"step, next launched before reading the last: {1e3 * overlapped:.3f} ms ({floor / overlapped:.0%} of floor)")
    print(f"  of which the host spent launching it:       {1e3 * launch:.2f} ms")
    print(f"step, one at a time (host + device):          {1e3 * serial:.2f} ms")
    print(f"device time per step (profiler): {device:.2f} ms")
    for name, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<46} {ms:6.2f} ms  {ms / device:5.1%}")
    if args.top:
        print(f"top {args.top} kernels: µs per step, calls per step, name")
        print("\n".join(top_kernels(prof, args.top, steps=5)))
    print("host time of 10 steps run one at a time, by function (the device wait is in synchronize):")
    pstats.Stats(host).sort_stats("tottime").print_stats(12)


def trace(runner: ModelRunner, seqs: list[SeqState], path: str) -> None:
    """The device's kernels and copies of six pipelined steps, as served: start (µs from the first),
    duration, gap after the previous event's end (negative: they overlap, as under PDL), name."""
    one = [1] * len(seqs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        pending = runner.launch(seqs, one)
        for _ in range(5):
            nxt = runner.launch(seqs, one)
            runner.collect(pending)
            pending = nxt
        runner.collect(pending)
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    t0, end = events[0].time_range.start, events[0].time_range.start
    with open(path, "w") as f:
        for e in events:
            start, stop = e.time_range.start, e.time_range.end
            f.write(f"{start - t0:10.2f} {stop - start:8.2f} {start - end:8.2f}  {e.name[:100]}\n")
            end = max(end, stop)
    print(f"trace of six pipelined steps: {path} ({len(events)} events)")


if __name__ == "__main__":
    main()
