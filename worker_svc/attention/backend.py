"""The interface every attention backend implements, so kernels can be swapped without touching
the model. K/V caches are [num_blocks, block_size, num_kv_heads, head_dim] per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from worker_svc.attention.metadata import AttnMetadata


@dataclass(frozen=True)
class QKNormRope:
    """What turns a step's raw q and k heads into the ones attention uses (Qwen3): RMSNorm of every
    head with q_weight or k_weight [head_dim], then neox RoPE at `positions` [T] from the angles'
    cos / sin tables [max_positions, head_dim / 2] (fp32)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    eps: float


class AttentionBackend(Protocol):
    name: str
    # Whether a prefill or mixed step may run inside a CUDA graph: its launches then depend only on
    # the tensors' shapes and on meta's bounds (max_query_len, max_seq_len), never on the host lists.
    captures_prefill: bool

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        """Writes the new tokens' k, v [T, kv_heads, head_dim] to their slots in the caches."""
        ...

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        """Whether the kernel that produces a step's k and v may write them into these caches itself,
        in place of `store`: True where `store` is exactly a scatter of each token's k and v to slot
        `meta.slot_mapping[t]` of caches in the layout above, slot -1 skipped. Raises where `store`
        would refuse the caches, as that check then has no other place to run."""
        ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [T, heads, head_dim] of the new tokens' q [T, heads, head_dim].

        Each query sees every context position up to its own. k and v are the new tokens' (already
        stored): enough on their own when `meta.has_prefix` is False, which lets a prefill from
        scratch skip reading the cache, and lets the warm-up run before the cache exists.
        """
        ...

    def attend_rope(
        self,
        qkv: torch.Tensor,
        rope: QKNormRope,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMetadata,
        scale: float,
        num_heads: int,
    ) -> torch.Tensor | None:
        """Where the backend can, all of a step's attention from its raw qkv projection [T, (num_heads +
        2 * kv_heads) * head_dim]: `rope` applied to q and k, k and v stored, then `attend`, in fewer
        launches. None where it cannot (this step's kind, or not at all): the caller then does each
        part itself."""
        ...
