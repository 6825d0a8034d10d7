"""Attention in plain PyTorch: correct on any device, the reference the fast kernels are held to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker_svc.attention.backend import QKNormRope
from worker_svc.attention.metadata import AttnMetadata


class TorchBackend:
    name = "torch"
    captures_prefill = False

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        keep = meta.slot_mapping >= 0
        slots = meta.slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = _narrow(k[keep], k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = _narrow(v[keep], v_cache.dtype)

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        return False  # the reference keeps its own store, whatever the model's kernels could do

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
        return None  # the reference norms, rotates and stores in separate steps

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
        if meta.is_decode and meta.has_prefix:
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        loc, lens = meta.query_start_loc_host, meta.seq_lens_host
        for i, seq_len in enumerate(lens):
            start, end = loc[i], loc[i + 1]
            if meta.has_prefix:
                keys = _context(k_cache, meta.block_tables[i], seq_len).to(q.dtype)  # widens an fp8 cache
                values = _context(v_cache, meta.block_tables[i], seq_len).to(q.dtype)
            else:
                keys, values = k[start:end], v[start:end]
            out[start:end] = _causal(q[start:end], keys, values, scale)
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata, scale: float
    ) -> torch.Tensor:
        # One query per seq: gather every seq's blocks into a padded batch and mask past its length.
        keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [S, kv_heads, ctx, D]
        values = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        ctx = torch.arange(keys.size(2), device=q.device)
        mask = (ctx[None, :] < meta.seq_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.squeeze(2)


def _narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into an fp8 cache saturated at its largest finite value (+-448), as
    the Triton store does."""
    if dtype == torch.float8_e4m3fn:
        top = torch.finfo(dtype).max
        x = x.clamp(-top, top)
    return x.to(dtype)


def _context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one seq's K or V [length, kv_heads, D], read through its blocks."""
    return cache[block_table[: -(-length // cache.size(1))]].flatten(0, 1)[:length]


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, H, D] are the last L positions of a context k, v [C, Hkv, D]; query i sees keys <= C-L+i."""
    offset = k.size(0) - q.size(0)
    mask = None
    if offset:
        mask = torch.ones(q.size(0), k.size(0), dtype=torch.bool, device=q.device).tril(offset)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
