"""The SwiGLU gate: silu(gate) * up, with gate and up side by side in one tensor.

One fused Triton kernel (layers/fused.py) on CUDA tensors; the torch code is the CPU path and the
reference it rounds like (silu rounded to the model dtype, then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from worker_svc.layers.fused import silu_and_mul  # imports triton: CUDA hosts only

            return silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The plain torch path: on the CPU, and the reference the kernel rounds like."""
        return silu_and_mul(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate, up] along the last dim, in plain torch."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
