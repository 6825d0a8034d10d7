"""The interface every attention backend implements, so kernels can be swapped without touching
the model. K/V caches are [num_blocks, block_size, num_kv_heads, head_dim] per layer."""

from __future__ import annotations

from typing import Protocol

import torch

from worker_svc.attention.metadata import AttnMetadata


class AttentionBackend(Protocol):
    name: str

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
