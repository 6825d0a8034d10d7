"""Where a prefill step goes: one prompt, as in the latency benchmark, or a throughput run's
big mixed step.

    PYTHONPATH=. python3 bench/profile_prefill.py [--prompt 256] [--prompts 1] [--decodes 0] [--top N]

Builds the worker's ModelRunner on dummy Qwen3-0.6B weights and times steps that prefill `prompts`
fresh `prompt`-token sequences and sample their first tokens, next to `decodes` running sequences
that each decode one token (the standard workload's first steps mix up to 8192 prompt tokens with
the decodes of the prompts already in). As served, a step of up to --prefill-graph-tokens tokens
replays a CUDA graph (0: every such step eager, as before those graphs existed).
It prints the host time of the launch alone and of the whole step (host + device), then splits
one such step's host time by function (cProfile) and its device time (torch profiler). Their sum
against the measured step says whether the step is bound by the host's launches or by the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from bench.timing import median, top_kernels
from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.seq_state import SamplingOptions, SeqState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--decodes", type=int, default=0, help="running sequences decoding in the same step")
    p.add_argument("--context", type=int, default=600, help="the decoding sequences' length")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--prefill-graph-tokens", type=int, default=2048, help="the worker's setting")
    p.add_argument("--top", type=int, default=0, help="also list the N kernels that take the most time")
    args = p.parse_args()
    n, k = args.prompt, args.prompts
    blocks = -(-n // 16)
    config = WorkerConfig(
        args.model,
        load_format="dummy",
        device="cuda",
        max_model_len=4096,
        prefill_graph_tokens=args.prefill_graph_tokens,
    )
    runner = ModelRunner(config)
    ids = iter(range(10**9))
    per_decode = -(-(args.context + args.repeats + 40) // 16)
    first = k * blocks
    opts, greedy = SamplingOptions(0.6), SamplingOptions(0.0)  # the prompts greedy, as in the latency run
    decodes = []
    for j in range(args.decodes):
        table = list(range(first + j * per_decode, first + (j + 1) * per_decode))
        decodes.append(SeqState(next(ids), [1] * args.context, args.context, 0, table, opts))
    for j in range(0, len(decodes), 8):
        runner.run(decodes[j : j + 8], [args.context] * len(decodes[j : j + 8]))
    launched: list[float] = []

    def step() -> None:
        i = next(ids)
        tokens = [[(7 * i + 3 * j + t) % 1000 for t in range(n)] for j in range(k)]
        seqs = [
            SeqState(i * 64 + j, tokens[j], n, 0, list(range(j * blocks, (j + 1) * blocks)), greedy) for j in range(k)
        ]
        t = time.perf_counter()
        pending = runner.launch(decodes + seqs, [1] * len(decodes) + [n] * k)
        launched.append(time.perf_counter() - t)
        runner.collect(pending)  # returns once the tokens are on the host
        for seq in seqs:
            runner.release(seq)

    for _ in range(3):
        step()
    times = []
    launched.clear()
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    host = cProfile.Profile()
    host.enable()
    step()
    host.disable()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
    device = sum(ev.device_time_total for ev in prof.key_averages()) / 1e3
    what = f"prefill of {k} x {n} tokens + first tokens, with {len(decodes)} decodes"
    print(f"{what}: launch (host) median {1e3 * median(launched):.2f} ms")
    print(f"{what}, host + device: median {1e3 * median(times):.2f} ms")
    print(f"device time (profiler): {device:.2f} ms")
    if args.top:
        print(f"top {args.top} kernels: µs in the step, calls, name")
        print("\n".join(top_kernels(prof, args.top)))
    print("host time of one such step, by function (the device wait is in synchronize):")
    pstats.Stats(host).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
