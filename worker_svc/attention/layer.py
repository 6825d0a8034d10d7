"""The attention step of one decoder layer: store the new K/V in this layer's cache, then attend."""

from __future__ import annotations

import torch
from torch import nn

from worker_svc.attention.backend import AttentionBackend, QKNormRope
from worker_svc.attention.metadata import AttnMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend = backend
        # Plain attributes, not buffers: the runner binds views of one big allocation after sizing it,
        # and they must stay out of the state dict.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def fused_store(self, meta: AttnMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache, slot_mapping) for the kernel that produces this step's k and v to write
        them there itself, which saves the store's launch; forward then gets stored=True. None when
        the backend stores its own way, or before the cache exists (the warm-up: nothing is stored)."""
        if self.k_cache.numel() and self.backend.fuses_store(self.k_cache):
            return self.k_cache, self.v_cache, meta.slot_mapping
        return None

    def attend_rope(self, qkv: torch.Tensor, rope: QKNormRope, meta: AttnMetadata) -> torch.Tensor | None:
        """[T, heads, D] from the raw qkv projection, with `rope` applied to q and k and k, v stored,
        where the backend does it all in its attention launch; None where the caller must do each
        part (the backend's choice, or the warm-up before the cache exists)."""
        if not self.k_cache.numel():
            return None
        return self.backend.attend_rope(qkv, rope, self.k_cache, self.v_cache, meta, self.scale, self.num_heads)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, stored: bool = False
    ) -> torch.Tensor:
        """q [T, heads, D], k and v [T, kv_heads, D] -> [T, heads, D]. stored: k and v are in the cache
        already (written by the kernel that was handed `fused_store`)."""
        if self.k_cache.numel() and not stored:  # the warm-up runs before the cache exists
            self.backend.store(k, v, self.k_cache, self.v_cache, meta)
        return self.backend.attend(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
