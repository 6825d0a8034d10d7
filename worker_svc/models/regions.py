"""A Qwen3 decoder layer's work outside attention and the row-parallel matmuls, as plain torch
functions of tensors: the regions that `--compile` hands to torch.compile (inductor), which fuses
the elementwise work around each matmul its own way, in place of layers/fused.py's kernels.

Each region runs from a residual add to just before a row-parallel matmul: add + RMSNorm, the qkv
matmul, q/k RMSNorm and RoPE before attention; add + RMSNorm, the gate/up matmul and SiLU-mul
before the down projection; and the final add + norm. Attention (it reads the step's metadata,
host lists included, on which dynamo would guard and recompile), the row-parallel matmuls and
their all-reduces stay eager. Taking the weights as arguments, every layer runs the same compiled
graph; the token count is the one size that varies, which dynamo makes dynamic once it has seen
two (see warmup.warm_up_compile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker_svc.layers.activation import silu_and_mul
from worker_svc.layers.norm import add_rms_norm
from worker_svc.layers.rotary import apply_rotary


def attn_in(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, heads, D] and k [T, kv_heads, D] normed and rotated, v, new residual) of x + residual;
    cos and sin are the fp32 angle tables [max_positions, D / 2]."""
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    qkv = F.linear(h, qkv_weight, qkv_bias)
    head_dim = q_weight.numel()
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = add_rms_norm(q.reshape(-1, num_heads, head_dim), None, q_weight, eps)[0]
    k = add_rms_norm(k.reshape(-1, num_kv_heads, head_dim), None, k_weight, eps)[0]
    c, s = cos[positions].unsqueeze(1).to(x.dtype), sin[positions].unsqueeze(1).to(x.dtype)
    return apply_rotary(q, c, s), apply_rotary(k, c, s), v.reshape(-1, num_kv_heads, head_dim), residual


def mlp_in(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up, new residual) of x + residual: the down projection's input."""
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    return silu_and_mul(F.linear(h, gate_up_weight)), residual


def final_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm(x, residual, weight, eps)[0]


@dataclass(frozen=True)
class Regions:
    """The three regions, each as written or compiled."""

    attn_in: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    mlp_in: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    final_norm: Callable[..., torch.Tensor]

    @classmethod
    def compiled(cls) -> Regions:
        # fullgraph: a graph break would split a region and bring eager ops back between its parts.
        return cls(*(torch.compile(f, fullgraph=True) for f in (attn_in, mlp_in, final_norm)))
