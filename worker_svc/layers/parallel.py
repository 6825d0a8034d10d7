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


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
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
