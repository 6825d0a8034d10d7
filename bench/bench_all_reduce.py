"""All-reduce latency between two GPUs at decode sizes, inside CUDA graphs as a decode step runs it.

    PYTHONPATH=. python3 bench/bench_all_reduce.py [--tp 2]

For [rows, hidden] bf16 tensors (rows = the decode batch), times NCCL's all-reduce (what the
workers use) against torch's symmetric-memory ops, which read the other GPUs' buffers over NVLink
with peer-to-peer loads (no NVLink multicast, which these machines forbid): the one-shot op (this
rank's copy into the shared buffer fused in) and the two-shot op (a copy, then reduce-scatter and
all-gather in one kernel). Each runs as a graph of 56 calls (two a layer of Qwen3-0.6B) replayed,
checked against NCCL's sum; rank 0 prints µs per call. docs/benchmarks.md (run L) has why the
workers stayed with NCCL.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS = 56


def timed(fn: Callable[[], object], replays: int = 20) -> float:
    """µs per call of `fn` (CALLS calls of one all-reduce) captured in a CUDA graph."""
    for _ in range(2):
        fn()  # warm-up outside the graph: NCCL and the symm_mem ops set up lazily
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays / CALLS


def repeat(fn: Callable[[], torch.Tensor]) -> None:
    for _ in range(CALLS):
        fn()


def nccl(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    dist.all_reduce(y)
    return y


def one_shot(shared: torch.Tensor, group: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    mine = shared[: x.numel()].view_as(x)
    return torch.ops.symm_mem.one_shot_all_reduce_copy_out(mine, x, "sum", group, out)


def two_shot(shared: torch.Tensor, group: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    mine = shared[: x.numel()].view_as(x)
    mine.copy_(x)
    return torch.ops.symm_mem.two_shot_all_reduce_out(mine, "sum", group, out)


def run(rank: int, args: argparse.Namespace) -> None:
    from torch.distributed import _symmetric_memory as symm_mem

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=args.tp)
    device = torch.device("cuda", rank)
    group = dist.group.WORLD.group_name
    shared = symm_mem.empty(512 * args.hidden, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(shared, group)
    if rank == 0:
        print(f"{args.tp} ranks, hidden {args.hidden}, bf16, µs per all-reduce in a graph of {CALLS}")
        print(f"{'rows':>5} {'KB':>6} {'NCCL':>7} {'one-shot':>9} {'two-shot':>9}")
    for rows in (1, 4, 16, 32, 64, 128, 256, 512):
        gen = torch.Generator(device=device).manual_seed(rank * 1000 + rows)
        x = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16, generator=gen)
        methods = [partial(nccl, x), partial(one_shot, shared, group, x), partial(two_shot, shared, group, x)]
        want = nccl(x).float()
        for fn in methods[1:]:
            err = (fn().float() - want).abs().max().item()
            assert err <= 0.02 * want.abs().max().item(), (fn, rows, err)
        times = [timed(partial(repeat, fn)) for fn in methods]
        if rank == 0:
            cols = " ".join(f"{t:>{w}.1f}" for t, w in zip(times, (7, 9, 9), strict=True))
            print(f"{rows:>5} {x.numel() * 2 / 1024:>6.0f} {cols}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()
    mp.spawn(run, args=(args,), nprocs=args.tp)


if __name__ == "__main__":
    main()
