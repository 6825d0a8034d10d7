"""Attention backend on the Triton kernels in triton_kernels.py, plus their host-side launchers.

The launchers read only shapes, strides and Python ints (never tensor values), so a decode step is
safe to capture in a CUDA graph: the grid depends on the batch size and on `meta.max_seq_len`,
which the graph capture should set to the max model length (the split count then stays valid for
any sequence the graph will replay with).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton

from worker_svc.attention.backend import QKNormRope
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.attention.triton_kernels import (
    decode_merge_kernel,
    decode_split_kernel,
    prefill_kernel,
    store_kvcache_kernel,
)
from worker_svc.layers import pdl

LOG2E = 1.4426950408889634
MIN_SPLIT_LEN = 128  # a split shorter than this is not worth its partial write + merge read
MAX_SPLITS = 32
PROGRAMS_PER_SM = 4  # decode programs resident on an SM at once (see choose_num_splits)
MERGE_TICKETS = 1 << 16  # (sequence, kv head) pairs decode's fused merge serves; past that, a merge kernel
# A single sequence's rope decode (a single request): at most this many splits, over keys in tiles this
# long. Fewer, longer splits keep each program streaming longer per wait and leave fewer partials to
# merge; 8 rather than 16 won in the whole step (docs/lab-notes.md, run AU).
ONE_SEQ_MAX_SPLITS = 8
ONE_SEQ_BLOCK_N = 128


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split-K factor for decode so the grid holds ~4 programs per SM.

    A decode program is small (sm_90 build at head_dim 128: ~39 KB shared memory, 108 registers x
    128 threads), so 4 fit an SM at once, and together they keep enough loads in flight for HBM.
    Big batches already fill the GPU (256 seqs x 8 kv heads = 2048 programs) and get 1 split: no
    partials, no merge kernel. `max_seq_len` may be a loose bound: it only caps the count, as the
    kernel sizes each split from the real seq_len and surplus splits are near-free empty programs.
    """
    base = num_seqs * num_kv_heads
    target = PROGRAMS_PER_SM * num_sms
    if base >= target:
        return 1
    useful = triton.cdiv(max(max_seq_len, 1), MIN_SPLIT_LEN)
    return max(1, min(triton.cdiv(target, base), useful, MAX_SPLITS))


@functools.cache
def device_num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs on CPU tensors: size splits as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(q: torch.Tensor) -> str:
    """float32 runs are the exactness check against the reference, so their dots stay IEEE fp32
    rather than TF32; half-precision inputs ignore the setting."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), (
        "cache must be [num_blocks, block_size, kv_heads, head_dim] with evenly strided slots"
    )
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    assert block_size & (block_size - 1) == 0 and head_dim & (head_dim - 1) == 0 and head_dim >= 16


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k/v [T, kv_heads, head_dim] (last dim contiguous) into the caches; slot -1 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(k_cache, v_cache)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.shape[2:] == k.shape[1:]
    store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        SATURATE=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    rope: QKNormRope | None = None,
    slot_mapping: torch.Tensor | None = None,
    tickets: torch.Tensor | None = None,
    release: bool = False,
    query_start_loc: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [S, heads, D], one new token per sequence (row s is sequence s) -> [S, heads, D].
    order: int32 [S], a permutation of the rows to start the programs in (longest first pays).

    query_start_loc (a mixed step): q is the step's [T, heads, D] and sequence s's tokens start at
    query_start_loc[s]; only the one-token sequences are attended, each into its row of `out`
    (required), which the prefill kernel fills for the others.

    rope: q is the query part of a raw qkv projection [S, (heads + 2 * kv_heads) * D], whose q
    and k heads are still to be normed and rotated; the kernel does that itself, and writes each
    row's k and v to the caches at slot_mapping[s] (-1: not stored) before it reads them back:
    what qk_norm_rope with the cache store and then this function without rope do, in one launch.
    On a GPU the two agree to rounding, not bit for bit: this variant is built without FMA
    contraction, and its sums of squares run in another order (tests/gpu/check_kernels.py).

    tickets: zeroed int32, one per (sequence, kv head) at least, left zeroed: with splits, the last
    split of each pair to finish merges the partials, instead of a merge kernel after the launch.

    release (sm_90 and later): every program lets the next kernel launch once its keys are read, so
    a matmul after it launched with PDL (layers/pdl.py) loads its weights during the partials' merge."""
    num_seqs, (_, num_heads, head_dim) = seq_lens.shape[0], q.shape
    _check_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    mixed = query_start_loc is not None
    assert q.stride(-1) == 1 and group * num_kv_heads == num_heads and (mixed or q.shape[0] == num_seqs)
    assert not mixed or (out is not None and order is None and rope is None and query_start_loc.numel() > num_seqs)
    assert order is None or (order.shape == (num_seqs,) and order.dtype == torch.int32)
    if rope is not None:
        # (a one-row view may report any row stride: the kernel reads k and v beside q, in q's row)
        assert q.stride(1) == head_dim and (num_seqs == 1 or q.stride(0) >= (num_heads + 2 * num_kv_heads) * head_dim)
        assert slot_mapping is not None and slot_mapping.shape == (num_seqs,) and rope.positions.shape == (num_seqs,)
        assert rope.cos.shape[1] * 2 == head_dim and rope.cos.stride(-1) == rope.sin.stride(-1) == 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    # 64-token K and V tiles (2 x 16 KB at head_dim 128 bf16) per loop step; halved for head_dim 256
    # so the tiles still fit the register/shared-memory budget of a 4-warp program. num_stages=3 lets
    # Triton's pipeliner also prefetch the block-table entries a step ahead (with 2 it issues that
    # load synchronously right before the K/V copies, exposing its latency every step).
    # Widening fp8 tiles to fp16 takes registers: a 4-warp program then needs so many (sm_90: ~145
    # a thread) that only 3 fit an SM, where 2-warp programs fit 4, each with its tiles in flight.
    block_n = block_n or (64 if head_dim <= 128 and q.element_size() <= 2 else 32)
    num_warps = num_warps or (2 if k_cache.element_size() == 1 else 4)
    fused_merge = num_splits > 1 and tickets is not None and tickets.numel() >= num_seqs * num_kv_heads
    if mixed and not fused_merge:
        num_splits = 1  # the merge kernel writes row s: it knows nothing of query_start_loc
    if num_splits > 1:
        mid_o = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # not touched without SPLIT
    decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, order if order is not None else seq_lens, out, mid_o, mid_lse,
        tickets if fused_merge else seq_lens,
        query_start_loc if mixed else seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        # Without rope these are never read: any tensors (and zeros) fill them.
        *((rope.q_weight, rope.k_weight, rope.cos, rope.sin, rope.positions, slot_mapping,
           rope.cos.stride(0), rope.sin.stride(0), rope.eps) if rope is not None else (q,) * 6 + (0, 0, 0.0)),
        GROUP=group,
        GROUP_POW2=triton.next_power_of_2(group),
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        MIN_SPLIT_LEN=MIN_SPLIT_LEN if num_splits > 1 else 1,
        SPLIT=num_splits > 1,
        # One width for every split count up to MAX_SPLITS, so the count makes no variant of its own
        # (the fused merge masks the splits past it).
        SPLITS_POW2=triton.next_power_of_2(max(num_splits, MAX_SPLITS)) if num_splits > 1 else 1,
        ORDERED=order is not None and num_seqs > 1,  # one row's order is itself: no load in front of the rest
        DOT_PRECISION=dot_precision(q),
        ROPE=rope is not None,
        NUM_Q_HEADS=num_heads,
        SATURATE=k_cache.dtype == torch.float8_e4m3fn,
        FUSED_MERGE=fused_merge,
        RELEASE=release,
        MIXED=mixed,
        num_warps=num_warps,
        num_stages=num_stages,
        # The norm and RoPE round like the torch path only without FMA contraction (layers/fused.py).
        enable_fp_fusion=rope is None,
    )  # fmt: skip
    if num_splits > 1 and not fused_merge:
        decode_merge_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_POW2=triton.next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 1,
        )  # fmt: skip
    return out


SHORT_Q = 16  # query length served by the 16-row prefill tiles when a batch mixes short and long
INT32_MAX = 2**31 - 1


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    paged: bool = True,
    split_short: bool = False,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    skip_single: bool = False,
    short_rows: bool = True,
) -> torch.Tensor:
    """Varlen causal attention of q [T, heads, D] over each sequence's context.

    paged=True: k/v are the caches [num_blocks, block_size, kv_heads, D] holding the whole context
    (prefix + this step's tokens). paged=False: k/v are this step's [T, kv_heads, D] and no
    sequence has a prefix (seq_lens == query lengths). split_short: the batch mixes sequences of
    <= SHORT_Q new tokens (decode rows) with longer ones; the short ones then get their own launch
    with 16-row tiles instead of dragging a mostly empty 128-row tile through their whole context.
    skip_single: one-token sequences are left alone (decode_attention serves them, into `out`);
    short_rows=False: with split_short, the caller knows no sequence has 2 to SHORT_Q new tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if paged:
        _check_cache(k, v)
        row_dim, block_size = 1, k.shape[1]
    else:
        assert k.shape[0] == num_tokens and v.shape[0] == num_tokens
        row_dim, block_size = 0, 1
    num_kv_heads = k.shape[-2]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and num_heads % num_kv_heads == 0
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    def launch(bm: int, min_q: int, max_q: int) -> None:
        bn = block_n or (64 if head_dim <= 128 else 32)
        warps = num_warps or (8 if bm >= 128 or head_dim >= 256 else 4)
        packed = min(max_query_len, max_q) > bm  # some sequence served needs several tiles: prefill_kernel's slots
        prefill_kernel[(num_heads, num_tokens // bm + num_seqs if packed else num_seqs)](
            q, k, v, block_tables, seq_lens, query_start_loc, out,
            scale * LOG2E, min_q, max_q, num_seqs,
            q.stride(0), q.stride(1),
            k.stride(row_dim), k.stride(row_dim + 1),
            v.stride(row_dim), v.stride(row_dim + 1),
            block_tables.stride(0),
            out.stride(0), out.stride(1),
            PAGED=paged,
            GROUP=num_heads // num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_M=bm,
            BLOCK_N=bn,
            DOT_PRECISION=dot_precision(q),
            PACKED=packed,
            num_warps=warps,
            num_stages=num_stages,
        )  # fmt: skip

    # Long prompts: 128-row tiles (wgmma-sized on Hopper); 64 at head_dim 256 to bound registers.
    big = block_m or (128 if max_query_len > 64 and head_dim <= 128 else 64 if max_query_len > SHORT_Q else 16)
    if q.element_size() > 2:  # float32 tiles take twice the shared memory: halve the rows
        big = min(big, 64)
        num_stages = min(num_stages, 2)
    lo = 2 if skip_single else 0
    if split_short and max_query_len > SHORT_Q and block_m is None:
        if short_rows:
            launch(16, lo, SHORT_Q)
        launch(big, SHORT_Q + 1, INT32_MAX)
    else:
        launch(big, lo, INT32_MAX)
    return out


class TritonBackend:
    """AttentionBackend on Triton kernels: paged store, split-K GQA decode, varlen paged prefill."""

    name = "triton"
    captures_prefill = True

    def __init__(self, num_sms: int | None = None) -> None:
        self.num_sms = num_sms  # None: ask the device (lets tests or tuning pin the split count)
        self._tickets: torch.Tensor | None = None  # decode's fused merge (see tickets())
        self._mixed_cache: tuple[AttnMetadata | None, tuple[bool, bool]] = (None, (False, False))

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
    ) -> None:
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        return True  # `store` is store_kvcache: a plain scatter by slot

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
        if not meta.has_prefix:
            # Every context is just this step's tokens: read them from k/v directly, contiguous and
            # valid before the cache exists (warm-up). Checked before is_decode so a step of
            # 1-token prompts never reads the cache.
            return prefill_attention(
                q, k, v, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, scale,
                paged=False,
            )  # fmt: skip
        if meta.is_decode:
            return decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, self.splits(k_cache, meta),
                order=meta.decode_order, tickets=self.tickets(q.device),
            )  # fmt: skip
        singles, shorts = self.mix(meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if singles:
            # One-token rows (decodes beside prompt chunks) in the decode kernel: it reads each K/V
            # tile once for the query heads sharing it, where the prefill kernel reads it per head.
            decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, self.splits(k_cache, meta), out=out,
                tickets=self.tickets(q.device), query_start_loc=meta.query_start_loc,
            )  # fmt: skip
        return prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, scale,
            split_short=singles or shorts, out=out, skip_single=singles, short_rows=shorts,
        )  # fmt: skip

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
        if not (meta.is_decode and meta.has_prefix):
            return None
        num_seqs, (_, _, num_kv_heads, head_dim) = qkv.shape[0], k_cache.shape
        sms = self.num_sms or device_num_sms(qkv.device)
        splits = self.splits(k_cache, meta)
        # Each program norms and rotates its q before its first K/V load, about a µs in which it
        # streams nothing, and that is paid once per wave of programs. Past two waves (~4 programs
        # an SM at once) it costs more than the launch it saves (docs/lab-notes.md has the steps timed).
        if num_seqs * num_kv_heads * splits > 2 * PROGRAMS_PER_SM * sms:
            return None
        q = qkv[:, : num_heads * head_dim].view(num_seqs, num_heads, head_dim)
        # One sequence (a single request's decode) has few programs: see ONE_SEQ_MAX_SPLITS.
        one = num_seqs == 1 and k_cache.element_size() == 2 and head_dim <= 128
        return decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
            min(splits, ONE_SEQ_MAX_SPLITS) if one else splits, order=meta.decode_order, rope=rope,
            slot_mapping=meta.slot_mapping, tickets=self.tickets(qkv.device),
            block_n=ONE_SEQ_BLOCK_N if one else None, release=pdl.enabled(qkv),
        )  # fmt: skip

    def splits(self, k_cache: torch.Tensor, meta: AttnMetadata) -> int:
        """Decode's split count for the step's sequences (choose_num_splits)."""
        sms = self.num_sms or device_num_sms(k_cache.device)
        return choose_num_splits(meta.seq_lens.shape[0], k_cache.shape[2], meta.max_seq_len, sms)

    def tickets(self, device: torch.device) -> torch.Tensor | None:
        """Zeroed tickets for decode's fused merge, made on first use. Not inside a CUDA graph's
        capture: a buffer made there would live in the graph's memory pool, which other graphs reuse
        (the steps' graphs run a step eagerly before capturing it, so the first use is outside)."""
        if self._tickets is None or self._tickets.device != device:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            self._tickets = torch.zeros(MERGE_TICKETS, dtype=torch.int32, device=device)
        return self._tickets

    def mix(self, meta: AttnMetadata) -> tuple[bool, bool]:
        """Whether a step with a sequence of over SHORT_Q new tokens also has one-token sequences
        (e.g. decodes), and sequences of 2 to SHORT_Q; computed once per step from the host copy of
        query_start_loc (every layer sees the same meta object). A captured step (no host copy) may
        hold anything: (True, True), every launch."""
        if self._mixed_cache[0] is not meta:
            lens = [b - a for a, b in itertools.pairwise(meta.query_start_loc_host)]
            plan = (False, False)
            if meta.max_query_len > SHORT_Q:
                plan = (not lens or 1 in lens, not lens or any(1 < n <= SHORT_Q for n in lens))
            self._mixed_cache = (meta, plan)
        return self._mixed_cache[1]
