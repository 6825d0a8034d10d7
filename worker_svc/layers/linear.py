"""Linear layers split across tensor-parallel ranks.

Column-parallel layers split their output features, so each rank computes a slice of the result
and no communication is needed; row-parallel layers split their input features and sum the
partial products with an all-reduce. Attention and MLP pair one of each, so a decoder layer
costs two all-reduces. Every parameter carries a `weight_loader` that copies this rank's slice
of a full checkpoint tensor.

One or two rows (the decode step of one or two sequences) on CUDA go through layers/gemv.py's kernels
instead of cuBLAS, and the layers fed by a norm or by the SwiGLU gate take that op into the same kernel
(`norm_forward`, `act_forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers.activation import SiluAndMul
from worker_svc.layers.norm import RMSNorm
from worker_svc.layers.parallel import all_reduce, divide, tp_rank, tp_size

# Row counts that go through layers/gemv.py's kernels instead of cuBLAS: one read of the weights
# serves every row. From 4 rows on, the kernel's one reduction a row costs more than cuBLAS's
# small-M kernels take (bench/profile_step.py --batch 1,2,4,8; docs/lab-notes.md, run AS).
GEMV_ROWS = (1, 2)


def few_rows(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether x @ W.T (with its residual, if any) runs as layers/gemv.py's kernel."""
    m = x.shape[0]
    dense = m == 1 or (x.stride(0) == x.shape[1] and (residual is None or residual.stride(0) == residual.shape[1]))
    return x.is_cuda and m in GEMV_ROWS and dense


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T (+ bias)."""
    if not few_rows(x):
        return F.linear(x, weight, bias)
    from worker_svc.layers.gemv import gemv  # imports triton: CUDA hosts only

    y = gemv(x, weight)[0]
    return y + bias if bias is not None else y


class _ShardedLinear(nn.Module):
    """Holds a [out, in] weight of which dim `split_dim` is this rank's share of the full layer."""

    def __init__(self, in_local: int, out_local: int, bias: bool, split_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.split_dim = tp_rank(), tp_size(), split_dim
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        if param.dim() <= self.split_dim:  # a row-parallel bias is whole on every rank
            param.data.copy_(loaded)
            return
        size = param.size(self.split_dim)
        param.data.copy_(loaded.narrow(self.split_dim, self.tp_rank * size, size))


class ColumnParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, divide(out_features, tp_size(), "output features"), bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias)

    def norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(normed), residual) for (normed, residual) = norm.add_norm(x, residual)."""
        if not few_rows(x, residual):
            x, residual = norm.add_norm(x, residual)
            return self(x), residual
        from worker_svc.layers.gemv import NORM, gemv

        y, new_residual = gemv(x, self.weight, NORM, residual, norm.weight, norm.eps)
        assert new_residual is not None
        return (y + self.bias if self.bias is not None else y), new_residual


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of the same input in one matmul (gate and up projections).

    Each rank's weight stacks its slice of every part, so the output splits back per part locally.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = out_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """Query, key and value projections in one matmul; each rank gets whole heads of each."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = tp_size()
        divide(num_heads, tp, "number of attention heads")
        divide(num_kv_heads, tp, "number of key/value heads")
        kv = num_kv_heads * head_dim
        super().__init__(hidden, [num_heads * head_dim, kv, kv], bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        super().weight_loader(param, loaded, "qkv".index(str(shard_id)))


class RowParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(in_features, tp_size(), "input features"), out_features, bias, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(matmul(x, self.weight))

    def act_forward(self, x: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        """self(act(x)): the MLP's down projection of the gate and up projections' output."""
        if not few_rows(x):
            return self(act(x))
        from worker_svc.layers.gemv import SILU, gemv

        return self._reduce(gemv(x, self.weight, SILU)[0])

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = all_reduce(y)
        # The bias goes in after the sum; adding it on every rank would count it tp_size times.
        return y + self.bias if self.bias is not None else y
