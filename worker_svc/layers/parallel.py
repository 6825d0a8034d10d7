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


class OneShotAllReduce:
    """A sum over the ranks of one host's GPUs through symmetric memory: one kernel copies this
    rank's input into a buffer every rank maps, waits for the others, and adds all the buffers over
    NVLink (torch's symm_mem one-shot op, which uses peer-to-peer loads and no NVLink multicast).
    A decode step makes two all-reduces a layer of a few KB to 1 MB; NCCL's ring takes ~9 µs for
    each inside a CUDA graph (2 x H100, benchmarks run K), mostly its fixed cost. Larger inputs
    (prefill) stay with NCCL, which moves each byte fewer times."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.group = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group)  # collective: every rank allocates alike
        ones = self(torch.ones(64, dtype=dtype, device=device))
        if not bool((ones == dist.get_world_size()).all()):
            raise RuntimeError("the one-shot all-reduce summed wrongly")

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.is_contiguous() and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        shared = self.buffer[: x.numel()].view_as(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(shared, x, "sum", self.group, out)


_one_shot: OneShotAllReduce | None = None


def use_one_shot(device: torch.device, dtype: torch.dtype, max_bytes: int = 1 << 20) -> str | None:
    """From now on, all_reduce sums `dtype` tensors of up to max_bytes with OneShotAllReduce; every
    rank must call it (it is a collective). Returns why not where it cannot be set up (GPUs that
    cannot map each other's memory, a torch without the op): all_reduce then stays with NCCL."""
    global _one_shot
    try:
        _one_shot = OneShotAllReduce(device, dtype, max_bytes)
    except (RuntimeError, AttributeError) as e:
        return str(e)
    return None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's x: x itself, summed in place, or a new tensor."""
    if tp_size() == 1:
        return x
    if _one_shot is not None and _one_shot.fits(x):
        return _one_shot(x)
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
