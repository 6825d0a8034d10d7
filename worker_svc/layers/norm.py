"""RMSNorm, computed in float32 whatever the model dtype, as the reference implementation does.

On CUDA tensors it runs as one fused Triton kernel (layers/fused.py), which also takes the
residual add before a decoder sublayer's norm; the torch code here is the CPU path and the
reference that kernel rounds like.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_norm(x, None)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a sublayer's input and the new residual stream.

        residual None (the first layer's input norm) gives (norm(x), x).
        """
        if x.is_cuda:
            from worker_svc.layers.fused import add_rms_norm  # imports triton: CUDA hosts only

            return add_rms_norm(x, residual, self.weight, self.eps)
        return self.add_norm_torch(x, residual)

    def add_norm_torch(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """add_norm in plain torch: the CPU path, and the reference the kernel rounds like."""
        return add_rms_norm(x, residual, self.weight, self.eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) over the last dim, in plain torch."""
    if residual is not None:
        x = x + residual  # rounded to the model dtype: the residual stream is kept in it
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Cast back before the weight so low-precision runs round where the reference rounds.
    return weight * x32.to(x.dtype), x
