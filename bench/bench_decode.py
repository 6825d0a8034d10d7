"""Decode attention over ragged contexts, as the standard workload's decode steps see them: the
achieved KV-read bandwidth per batch size and split count, and whether the order of the rows
(the scheduler's arrival order against longest first) changes it.

    PYTHONPATH=. python3 bench/bench_decode.py [--lo 200] [--hi 2000] [--kv-cache-dtype fp8] [--sweep]

Each row's context length is drawn uniformly from [lo, hi] (seed 0); the cache holds them in
shuffled blocks of 16. Every figure is the median of CUDA-graph replays with L2 flushed before
each (triton.testing.do_bench), in µs and GB/s of K and V read. `auto` marks the split count the
backend picks (triton_backend.choose_num_splits). --sweep times, per batch, every combination of
split count, shortest split, K/V tile and warps instead, and prints the fastest (rows longest first).
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
from triton.runtime.errors import OutOfResources

from bench.timing import replay_us
from worker_svc.attention import triton_backend as tb
from worker_svc.config import KV_CACHE_DTYPES

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16


def case(
    lens: list[int], cache_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_cache, v_cache, block_tables, seq_lens for one decode row per length."""
    blocks = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks), device="cuda").int()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    shape = (sum(blocks), BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda").to(cache_dtype)
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda").to(cache_dtype)
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
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="as the worker's (auto: bf16)")
    p.add_argument("--sweep", action="store_true", help="time every combination of the four lists below")
    p.add_argument("--splits", default="1,2,4,8,16,32", help="--sweep: split counts")
    p.add_argument("--min-split", default="32,64,128,256", help="--sweep: shortest split lengths")
    p.add_argument("--block-n", default="32,64,128", help="--sweep: K/V tile lengths")
    p.add_argument("--warps", default="2,4,8", help="--sweep: warps a program")
    args = p.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    sms = tb.device_num_sms(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    print(f"{name}, {sms} SMs; contexts uniform in [{args.lo}, {args.hi}], {cache_dtype} cache")
    for b in map(int, args.batches.split(",")):
        rng = random.Random(0)
        lens = [rng.randint(args.lo, args.hi) for _ in range(b)]
        kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * cache_dtype.itemsize
        auto = tb.choose_num_splits(b, KV_HEADS, 4096, sms)  # the graphs' bound: the max model length
        if args.sweep:
            grid = [list(map(int, g.split(","))) for g in (args.splits, args.min_split, args.block_n, args.warps)]
            sweep(b, case(sorted(lens, reverse=True), cache_dtype), kv_bytes, auto, grid)
            continue
        for order, ls in (("arrival", lens), ("longest first", sorted(lens, reverse=True))):
            data = case(ls, cache_dtype)
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


def sweep(batch: int, data: tuple, kv_bytes: int, auto: int, grid: list[list[int]]) -> None:
    """The backend's pick, then the five fastest of splits x shortest split x K/V tile x warps."""
    default_min = tb.MIN_SPLIT_LEN
    results = []
    for splits, min_len, block_n, warps in itertools.product(*grid):
        if splits == 1 and min_len != min(grid[1]):
            continue  # one split ignores the shortest split: time it once
        tb.MIN_SPLIT_LEN = min_len
        try:
            us = timed(data, splits, block_n=block_n, num_warps=warps)
        except OutOfResources:
            continue
        finally:
            tb.MIN_SPLIT_LEN = default_min
        results.append((us, splits, min_len, block_n, warps))
    picked = timed(data, auto)
    rate = kv_bytes / picked / 1e3
    print(f"b={batch:<4} picked ({auto} splits, shortest {default_min}): {picked:7.1f} µs {rate:5.0f} GB/s")
    for us, splits, min_len, block_n, warps in sorted(results)[:5]:
        cfg = f"{splits:2} splits, shortest {min_len:3}, block_n {block_n}, {warps} warps"
        print(f"       {cfg}: {us:7.1f} µs", flush=True)


if __name__ == "__main__":
    main()
