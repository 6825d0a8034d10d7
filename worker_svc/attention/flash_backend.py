"""Attention backend on flash-attn 2.x (the `flash-attn` package): varlen prefill over the paged
cache and paged decode. flash-attn-4 (`flash_attn.cute`) has its own backend, flash4_backend.py.

flash-attn is imported when the backend is built, not when this module is, so the module stays
importable (and testable) where flash-attn is not installed. flash-attn has no kernel that writes
K/V into a paged cache by slot, so `store` reuses the Triton one, or a torch scatter without Triton;
on CUDA, the model's q/k norm + RoPE kernel may store them instead (`fuses_store`).

Two limits of flash-attn 2.x are checked here, so they fail with the fix in the message instead
of a RuntimeError from inside the extension:
- A paged cache needs a block size divisible by 256: flash_api.cpp checks `page_block_size % 256`
  in both varlen_fwd and fwd_kvcache, from paged KV's arrival (2.5.0) to 2.8.x. The upstream pull
  request for smaller pages was never merged; forks (vLLM's vllm-flash-attn) accept multiples of 16.
- float16 and bfloat16 only.

Decode is safe to capture in a CUDA graph: it passes flash-attn the metadata's tensors and nothing
read back from them, and flash-attn sizes its launch (split count included) from shapes alone.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker_svc.attention.backend import QKNormRope
from worker_svc.attention.metadata import AttnMetadata

PAGE_MULTIPLE = 256
MIN_VERSION = (2, 6)  # flash_attn_varlen_func took block_table in March 2024; the `flash` extra asks 2.6
HALF_DTYPES = (torch.float16, torch.bfloat16)

StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def installed() -> bool:
    """Whether flash-attn 2.x is installed, without importing it. Not `find_spec("flash_attn")`:
    flash-attn-4 alone also makes `flash_attn` importable, as a namespace package around `cute`."""
    try:
        importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_half(q: torch.Tensor, backend: str) -> None:
    """Raises unless q is float16 or bfloat16, the only dtypes flash-attn's kernels (2.x and 4) take."""
    if q.dtype not in HALF_DTYPES:
        raise ValueError(
            f"{backend} computes in float16 or bfloat16 only, not {q.dtype}: "
            "pass --dtype bfloat16, or --attention-backend triton"
        )


def check_block_size(block_size: int) -> None:
    """Raises unless flash-attn 2.x accepts a paged cache of this block size."""
    if block_size % PAGE_MULTIPLE:
        raise ValueError(
            f"the flash-attn backend needs a KV cache block size divisible by {PAGE_MULTIPLE} "
            f"(flash-attn 2.x's paged KV limit), got {block_size}: pass --kvcache-block-size {PAGE_MULTIPLE}, "
            "or --attention-backend triton"
        )


class FlashAttnBackend:
    """AttentionBackend on flash-attn 2.x kernels; K/V stores go through `store_kvcache`."""

    name = "flash-attn"
    captures_prefill = False  # never captured on a GPU: left eager

    def __init__(self) -> None:
        try:
            import flash_attn
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as exc:  # also a build without its CUDA module, which lacks these names
            raise ImportError(
                "attention backend 'flash-attn' needs the flash-attn package (pip install 'nanovllm-grpc[flash]'), "
                "or flash-attn-4 on Hopper or Blackwell ('nanovllm-grpc[flash4]'); or pass --attention-backend triton"
            ) from exc
        version = getattr(flash_attn, "__version__", "0")
        if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
            raise ImportError(
                f"attention backend 'flash-attn' needs flash-attn >= {'.'.join(map(str, MIN_VERSION))}, "
                f"found {version}; or pass --attention-backend triton"
            )
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        # Every step with a cache stores before it attends, so this is the first place the block
        # size can be checked (the backend only learns it from the cache's shape).
        check_block_size(k_cache.shape[1])
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        # flash-attn reads the same [num_blocks, block_size, kv_heads, head_dim] layout that `store`
        # scatters into. `store` is where the block size gets checked; a fused store skips it, so
        # the check runs here.
        check_block_size(k_cache.shape[1])
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
        return None  # flash-attn's kernels take q and k as they come

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
        check_half(q, "flash-attn")
        if not meta.has_prefix:
            # Every context is just this step's tokens: attend to k/v directly, contiguous and valid
            # before the cache exists (warm-up). Checked before is_decode, like the Triton backend.
            return self._varlen(
                q, k, v, meta.query_start_loc, meta.query_start_loc, meta.max_query_len, meta.max_query_len,
                softmax_scale=scale, causal=True,
            )  # fmt: skip
        if meta.is_decode:
            out = self._with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True,
            )  # fmt: skip
            return out.squeeze(1)
        # With a block_table, flash-attn reads each seq's keys through its blocks and takes only the
        # lengths from cu_seqlens_k (the differences of consecutive entries), so build it from seq_lens.
        cu_seqlens_k = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            q, k_cache, v_cache, meta.query_start_loc, cu_seqlens_k, meta.max_query_len, meta.max_seq_len,
            softmax_scale=scale, causal=True, block_table=meta.block_tables,
        )  # fmt: skip


@functools.cache
def triton_store() -> StoreFn | None:
    """Our Triton K/V store where Triton is installed: flash-attn has no store into a paged cache by slot."""
    if importlib.util.find_spec("triton") is None:
        return None
    from worker_svc.attention.triton_backend import store_kvcache  # imports triton

    return store_kvcache


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The flash-attn backends' store: the Triton kernel on CUDA where Triton is installed, else scatter_kv."""
    kernel = triton_store() if k.is_cuda else None
    if kernel is not None:
        kernel(k, v, k_cache, v_cache, slot_mapping)
    else:
        scatter_kv(k, v, k_cache, v_cache, slot_mapping)


def scatter_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes k/v [T, kv_heads, head_dim] to their slots, skipping slot -1, with no host sync.

    Dropping the -1 rows by boolean indexing would sync with the host (nonzero), which a CUDA graph
    capture forbids. So every row writes, and a -1 row writes a value that its target gets anyway:
    the first stored row's slot and data (duplicate indices then carry equal values, so the write
    order does not matter), or, when no row is stored, slot 0's current content back onto itself.
    """
    if slot_mapping.numel() == 0:
        return
    keep = slot_mapping >= 0
    first = torch.argmax(keep.int()).view(1)  # argmax gives the first maximum: the first stored row
    first_kept = keep.index_select(0, first).view(1, 1, 1)
    anchor = slot_mapping.index_select(0, first).clamp(min=0)
    slots = torch.where(keep, slot_mapping, anchor)
    rows = keep.view(-1, 1, 1)
    for new, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        filler = torch.where(first_kept, new.index_select(0, first), flat.index_select(0, anchor))
        flat.index_put_((slots,), torch.where(rows, new, filler))
