"""Attention backend on flash-attn 4 (the `flash-attn-4` package, imported as `flash_attn.cute`):
one varlen function with a page table serves prefill and decode.

flash-attn-4 is Python on NVIDIA's CUTLASS DSL: it compiles each kernel variant on its first call
(seconds) and keeps it for the process. It is imported when the backend is built, so this module
imports where it is not installed. K/V stores are the flash-attn 2.x backend's (`store_kvcache`).

Its limits, from the 4.0.0b40 sources, checked here so they fail with the fix in the message:
- A page table needs 4.0.0b5 or later on sm_90: earlier betas assert "paged KV not supported on
  SM 9.0" (upstream commit 0372975 added it). Paged forward kernels exist for compute capability
  9.x, 10.x and 11.x only: sm_80 and sm_120 refuse a page table.
- Any block size: a page of exactly the kernel's key tile (128 at head_dim 128 on sm_90) loads by
  TMA, any other size row by row (cp.async), which needs a head_dim divisible by 16, <= 256.
- float16 and bfloat16 (its fp8 inputs are sm_100 only).
- No split-KV on sm_90 (SM100/SM110 only): a decode step runs one program per (sequence, KV
  head), so small batches use few SMs.

Decode is safe to capture in a CUDA graph: the call reads the metadata's tensors and the host
bound `max_seq_len`, and flash-attn-4 syncs with the host nowhere in its forward pass.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable

import torch

from worker_svc.attention.backend import QKNormRope
from worker_svc.attention.flash_backend import check_half, store_kv
from worker_svc.attention.metadata import AttnMetadata

DIST = "flash-attn-4"
MIN_VERSION = (4, 0, 0, 5)  # 4.0.0b5: the first release with paged KV on sm_90
PAGED_ARCHES = (9, 10, 11)  # compute capability majors whose forward kernels take a page table
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 16, 256


def installed_version() -> str | None:
    """flash-attn-4's version, None where it is not installed. Read from its distribution: its own
    `__version__` looks up another name and reads 0.0.0."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_key(version: str) -> tuple[int, int, int, int]:
    """4.0.0b40 -> (4, 0, 0, 40); a final release sorts after its betas."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)(?:b(\d+))?", version)
    if match is None:
        return (0, 0, 0, 0)
    major, minor, patch, beta = match.groups()
    return (int(major), int(minor), int(patch), int(beta) if beta is not None else 1 << 30)


def check_cache(k_cache: torch.Tensor) -> None:
    """Raises unless flash-attn-4 reads a paged cache of this layout [blocks, block_size, kv_heads, head_dim]."""
    head_dim = k_cache.shape[-1]
    if head_dim % HEAD_DIM_MULTIPLE or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"flash-attn-4 reads a paged cache with a head_dim divisible by {HEAD_DIM_MULTIPLE}, up to "
            f"{MAX_HEAD_DIM}; this model's is {head_dim}: pass --attention-backend triton"
        )


class FlashAttn4Backend:
    """AttentionBackend on flash-attn-4's `flash_attn_varlen_func`; K/V stores go through `store_kvcache`."""

    name = "flash-attn"
    captures_prefill = False  # never captured on a GPU: left eager

    def __init__(self, capability: tuple[int, int] | None = None) -> None:
        version = installed_version()
        if version is None or version_key(version) < MIN_VERSION:
            raise ImportError(
                f"attention backend 'flash-attn' on {DIST} needs version 4.0.0b5 or later (paged KV on sm_90), "
                f"found {version or 'none'}; or pass --attention-backend triton"
            )
        try:
            from flash_attn.cute import flash_attn_varlen_func
        except ImportError as exc:  # e.g. its runtime (nvidia-cutlass-dsl, quack-kernels) missing
            raise ImportError(
                f"{DIST} {version} is installed but flash_attn.cute does not import ({exc}); "
                "or pass --attention-backend triton"
            ) from exc
        major, minor = capability or torch.cuda.get_device_capability()
        if major not in PAGED_ARCHES:
            raise ValueError(
                f"{DIST} has paged-KV kernels for compute capability 9.x to 11.x (Hopper, Blackwell), "
                f"not {major}.{minor}: install flash-attn 2.x instead, or pass --attention-backend triton"
            )
        self._varlen: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = flash_attn_varlen_func

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        check_cache(k_cache)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        check_cache(k_cache)  # `store` is skipped where the model's kernel stores: check here too
        return True

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
        return None  # flash-attn-4 takes q and k as they come

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
        check_half(q, "flash-attn-4")
        # Every argument past q, k, v by keyword: the positions moved between releases (qv came 4th).
        if not meta.has_prefix:
            # Every context is just this step's tokens (also the warm-up, before the cache exists).
            out, _ = self._varlen(
                q, k, v, cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=meta.query_start_loc,
                max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_query_len, softmax_scale=scale, causal=True,
            )  # fmt: skip
            return out
        # With a page table, flash-attn-4 takes each context's length from seqused_k (it refuses
        # cu_seqlens_k there), and max_seqlen_k only as a bound: a CUDA graph's loose one is fine.
        paged = {"seqused_k": meta.seq_lens, "page_table": meta.block_tables, "max_seqlen_k": meta.max_seq_len}
        if meta.is_decode:
            # One query per sequence: the batch layout [seqs, 1, heads, head_dim], no cu_seqlens_q.
            out, _ = self._varlen(q.unsqueeze(1), k_cache, v_cache, softmax_scale=scale, causal=True, **paged)
            return out.squeeze(1)
        out, _ = self._varlen(
            q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            softmax_scale=scale, causal=True, **paged,
        )  # fmt: skip
        return out
