"""Where a new request's first step goes: the prefill of one prompt, as in the latency benchmark.

    PYTHONPATH=. python3 bench/profile_prefill.py [--prompt 256]

Builds the worker's ModelRunner on dummy Qwen3-0.6B weights and times steps that prefill a fresh
`prompt`-token sequence and sample its first token (eager, as served: CUDA graphs cover decode
only), host + device, then splits one such step's host time by function (cProfile) and its device
time (torch profiler). Their sum against the measured step says whether time to first token is
bound by the host's launches or by the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.seq_state import SamplingOptions, SeqState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    n = args.prompt
    blocks = -(-n // 16)
    runner = ModelRunner(WorkerConfig(args.model, load_format="dummy", device="cuda", max_model_len=4096))
    ids = iter(range(10**9))

    def step() -> None:
        i = next(ids)
        seq = SeqState(i, [(7 * i + t) % 1000 for t in range(n)], n, 0, list(range(blocks)), SamplingOptions(0.0))
        runner.run([seq], [n])  # returns once the token is on the host
        runner.release(seq)

    for _ in range(3):
        step()
    times = []
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
    print(f"prefill of {n} tokens + first token, host + device: median {1e3 * statistics.median(times):.2f} ms")
    print(f"device time (profiler): {device:.2f} ms")
    print("host time of one such step, by function (the device wait is in synchronize):")
    pstats.Stats(host).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
