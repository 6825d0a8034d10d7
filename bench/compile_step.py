"""Decode steps with and without --compile, on the CPU or a GPU, one runner after the other.

    PYTHONPATH=. python3 -m bench.compile_step [--model bench/qwen3-0.6b] [--device cpu] [--batch 1,8]

Builds the worker's ModelRunner (dummy weights) eager and then compiled, reporting how long each
took to start (the compiled one compiles every region then; run it twice to see inductor's disk
cache at work), prefills `batch` sequences of `context` tokens and times `steps` decode steps at
each batch size, as served (CUDA graphs on a GPU unless --enforce-eager).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.seq_state import SamplingOptions, SeqState


def decode_ms(runner: ModelRunner, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) median ms of a decode step of `batch` greedy seqs of `context` tokens, after 2
    untimed steps: medians, and CPU time too (all threads), as a shared CPU's neighbours make wall
    times of single steps noisy."""
    per = -(-(context + steps + 2) // runner.block_size)
    seqs = [
        SeqState(i, [1] * context, context, 0, list(range(i * per, (i + 1) * per)), SamplingOptions())
        for i in range(batch)
    ]
    runner.run(seqs, [context] * batch)
    for _ in range(2):
        runner.run(seqs, [1] * batch)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    wall, cpu = [], []
    for _ in range(steps):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        runner.run(seqs, [1] * batch)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    for seq in seqs:
        runner.release(seq)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--threads", type=int, default=0, help="torch's CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    blocks = max(batches) * -(-(args.context + args.steps + 2) // 16)
    torch.manual_seed(0)
    for mode in args.modes.split(","):
        config = WorkerConfig(
            args.model, load_format="dummy", device=args.device, max_model_len=args.context + args.steps + 2,
            num_kv_blocks=blocks,
            max_num_seqs=max(batches), enforce_eager=args.enforce_eager, compile=mode == "compiled",
        )  # fmt: skip
        start = time.perf_counter()
        runner = ModelRunner(config)
        built = time.perf_counter() - start
        print(f"{mode:>8}: start-up {built:.1f} s")
        for b in batches:
            wall, cpu = decode_ms(runner, b, args.context, args.steps)
            print(f"{mode:>8}: batch {b:>3}: decode step {wall:8.2f} ms wall, {cpu:8.2f} ms CPU (all threads)")
        print(f"{mode:>8}: compiles after start-up: {runner.graph_compiles.count}")
        del runner


if __name__ == "__main__":
    main()
