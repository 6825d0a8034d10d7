"""Decode attention over ragged contexts, as the standard workload's decode steps see them: the
achieved KV-read bandwidth per batch size and split count, and whether the order of the rows
(the scheduler's arrival order against longest first) changes it.

    PYTHONPATH=. python3 bench/bench_decode.py [--lo 200] [--hi 2000]

Each row's context length is drawn uniformly from [lo, hi] (seed 0); the cache holds them in
shuffled blocks of 16. Every figure is the median of CUDA-graph replays with L2 flushed before
each (triton.testing.do_bench), in µs and GB/s of K and V read. `auto` marks the split count the
backend picks (triton_backend.choose_num_splits).
"""

from __future__ import annotations

import argparse
import random

import torch
from triton.runtime.errors import OutOfResources

from bench.timing import replay_us
from worker_svc.attention import triton_backend as tb

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16


def case(lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_cache, v_cache, block_tables, seq_lens for one decode row per length."""
    blocks = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks), device="cuda").int()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    shape = (sum(blocks), BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(len(lens), HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32, device="cuda")


def timed(args: tuple, splits: int, **cfg: int) -> float:
    """Median µs of one decode_attention call replayed in a CUDA graph."""
    q, k, v, tables, lens = args
    out = torch.empty_like(q)
    return replay_us(lambda: tb.decode_attention(q, k, v, tables, lens, 0.088, splits, out=out, **cfg))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lo", type=int, default=200)
    p.add_argument("--hi", type=int, default=2000)
    p.add_argument("--batches", default="16,32,48,64,96,128,192,256")
    args = p.parse_args()
    sms = tb.device_num_sms(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; contexts uniform in [{args.lo}, {args.hi}]")
    for b in map(int, args.batches.split(",")):
        rng = random.Random(0)
        lens = [rng.randint(args.lo, args.hi) for _ in range(b)]
        kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * 2
        auto = tb.choose_num_splits(b, KV_HEADS, 4096, sms)  # the graphs' bound: the max model length
        for order, ls in (("arrival", lens), ("longest first", sorted(lens, reverse=True))):
            data = case(ls)
            cells = []
            for splits in sorted({1, 2, 4, 8, auto}):
                us = timed(data, splits)
                mark = "*" if splits == auto else " "
                cells.append(f"{splits}{mark} {us:7.1f} µs {kv_bytes / us / 1e3:5.0f} GB/s")
            if order == "arrival":
                for cfg in ({"block_n": 128, "num_stages": 2}, {"num_warps": 8}, {"num_stages": 4}):
                    try:
                        cells.append(f"{cfg} {timed(data, auto, **cfg):7.1f} µs")
                    except OutOfResources:  # too much shared memory for this tile x stages
                        cells.append(f"{cfg} out of resources")
            print(f"b={b:<4} {order:<14} " + " | ".join(cells), flush=True)
            del data


if __name__ == "__main__":
    main()
