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
    """A sum over the ranks of one host's GPUs through symmetric memory: torch's symm_mem one-shot
    op copies this rank's input into a buffer every rank maps, then adds every rank's buffer,
    read over NVLink (peer-to-peer loads; no NVLink multicast, which these machines forbid).

    Used for small inputs only. Inside a CUDA graph on 2 x H100 (bench/bench_all_reduce.py), it
    took 8-9 µs up to 64 KB on two machines, where NCCL took 14-18 µs on one and 7-9 µs on the
    other; above that NCCL was as fast or faster, and served throughput at TP=2 was 4% lower
    with every decode-size all-reduce on symmetric memory (docs/benchmarks.md, run L)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.group = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group)  # collective: every rank allocates alike
        total = self(torch.ones(self.buffer.numel(), dtype=dtype, device=device))
        if not bool((total == dist.get_world_size()).all()):
            raise RuntimeError("the symmetric-memory all-reduce summed wrongly")

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.is_contiguous() and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        shared = self.buffer[: x.numel()].view_as(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(shared, x, "sum", self.group, out)


_symm: SymmAllReduce | None = None


def use_symm_all_reduce(device: torch.device, dtype: torch.dtype, max_bytes: int = 64 << 10) -> str | None:
    """From now on, all_reduce sums `dtype` tensors of up to max_bytes with SymmAllReduce; every
    rank must call it (it is a collective). Returns why not where it cannot be set up (GPUs that
    cannot map each other's memory, a torch without the op): all_reduce then stays with NCCL."""
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
