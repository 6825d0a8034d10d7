"""The tensor-parallel group as the layers see it: torch.distributed's world when it is set up,
a world of one otherwise, so the same layers run unsharded in tests and on one GPU."""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts})")
    return total // parts


class SymmAllReduce:
    """A sum over the ranks of one host's GPUs through symmetric memory: a buffer every rank maps,
    read over NVLink by torch's symm_mem kernels (peer-to-peer loads, no NVLink multicast).

    A decode step makes two all-reduces a layer of 2 KB (one row) to 512 KB (256 rows). Inside a
    CUDA graph on 2 x H100 (bench/bench_all_reduce.py, docs/benchmarks.md) NCCL took 14-22 µs
    for each; the one-shot op, which copies this rank's part in and adds every rank's, 8-13 µs,
    and the two-shot op (reduce-scatter then all-gather, each rank adding a part) was faster from
    256 KB on. Larger inputs (prefill) stay with NCCL."""

    TWO_SHOT_FROM = 256 << 10  # bytes

    def __init__(self, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.group = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group)  # collective: every rank allocates alike
        for n in (64, self.TWO_SHOT_FROM // dtype.itemsize):  # one of each kind, checked
            total = self(torch.ones(n, dtype=dtype, device=device))
            if not bool((total == dist.get_world_size()).all()):
                raise RuntimeError(f"the symmetric-memory all-reduce of {n} elements summed wrongly")

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.is_contiguous() and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        shared = self.buffer[: x.numel()].view_as(x)
        if x.numel() * x.element_size() < self.TWO_SHOT_FROM:
            return torch.ops.symm_mem.one_shot_all_reduce_copy_out(shared, x, "sum", self.group, out)
        shared.copy_(x)
        return torch.ops.symm_mem.two_shot_all_reduce_out(shared, "sum", self.group, out)


_symm: SymmAllReduce | None = None


def use_symm_all_reduce(device: torch.device, dtype: torch.dtype, max_bytes: int = 1 << 20) -> str | None:
    """From now on, all_reduce sums `dtype` tensors of up to max_bytes with SymmAllReduce; every
    rank must call it (it is a collective). Returns why not where it cannot be set up (GPUs that
    cannot map each other's memory, a torch without the ops): all_reduce then stays with NCCL."""
    global _symm
    try:
        _symm = SymmAllReduce(device, dtype, max_bytes)
    except (RuntimeError, AttributeError) as e:
        return str(e)
    return None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's x: x itself, summed in place, or a new tensor."""
    if tp_size() == 1:
        return x
    if _symm is not None and _symm.fits(x):
        return _symm(x)
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """[ranks, *x.shape]: every rank's x, in rank order, on every rank."""
    out = x.new_empty(tp_size() * x.numel())  # flat: gloo takes no other shape
    dist.all_gather_into_tensor(out, x.contiguous())
    return out.view(tp_size(), *x.shape)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenates every rank's `x` along the last dim on rank 0; other ranks get None."""
    if tp_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None
