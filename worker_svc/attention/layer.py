"""The attention step of one decoder layer: store the new K/V in this layer's cache, then attend."""

from __future__ import annotations

import torch
from torch import nn

from worker_svc.attention.backend import AttentionBackend
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """q [T, heads, D], k and v [T, kv_heads, D] -> [T, heads, D]."""
        if self.k_cache.numel():  # the warm-up runs before the cache exists
            self.backend.store(k, v, self.k_cache, self.v_cache, meta)
        return self.backend.attend(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
