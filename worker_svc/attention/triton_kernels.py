"""Triton kernels for paged attention: KV-cache store, split-K GQA decode, and varlen prefill.

Cache layout (per layer): k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim],
contiguous, so logical position n of a sequence lives at slot block_table[n // block_size] *
block_size + n % block_size, and one (slot, kv_head) row is head_dim contiguous elements. Every
kernel reads whole rows with `d = tl.arange(0, HEAD_DIM)` as the fastest axis, which Triton turns
into 16-byte vector accesses (row strides are multiples of 16 bytes and specialised as such).

All softmax math is fp32 in base 2: the caller's scale is multiplied by log2(e) so `exp2` can be
used (one MUFU op, no extra multiply per score).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # One program per new token: it moves num_kv_heads * head_dim elements of K and of V.
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:  # padded / skipped token (e.g. CUDA-graph padding)
        return
    h = tl.arange(0, HEADS_POW2)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NUM_KV_HEADS
    # K/V may be strided views of a fused qkv output; only the last dim must be contiguous.
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot * stride_cache_slot + h * stride_cache_head + d  # slot is int64: no overflow
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    # Program = (kv head, sequence, split). It serves all GROUP query heads that share this kv head,
    # so every K/V tile is fetched from HBM once per group instead of once per query head. The
    # group is padded to BLOCK_H (>= 16, tl.dot's minimum M): padded rows load q = 0 and are never
    # stored; the wasted MMA work is free because the kernel is bound by HBM reads, not FLOPs.
    kvh = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + s)
    # The split length is derived from the *actual* seq_len, so a grid sized for a loose bound
    # (max model length under CUDA graphs) still spreads real work evenly; surplus splits get an
    # empty range and only write a "no keys" partial (lse = -inf).
    split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT_LEN)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    # Pure decode: sequence s owns exactly token s of the flat batch.
    q = tl.load(
        q_ptr + s.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None], other=0.0
    )

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    kv_base = kvh * stride_cache_head + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        # BLOCK_N spans BLOCK_N / BLOCK_SIZE cache blocks (or part of one): gather per-row slots.
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=nmask, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        off = slot[:, None] * stride_cache_slot + kv_base
        k = tl.load(k_cache_ptr + off, mask=nmask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_H, BLOCK_N] fp32
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        # Every iteration has >= 1 valid key, so m_new is finite and exp2 never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # empty range (or seq_len 0 padding) -> zeros, not NaN
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        dst = out_ptr + s.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        # Partials: mid_o [S, H, NUM_SPLITS, D] normalised, mid_lse [S, H, NUM_SPLITS] (base 2).
        row = (s.to(tl.int64) * (tl.num_programs(0) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=hmask[:, None])
        tl.store(mid_lse_ptr + row, m_i + tl.log2(l_i), mask=hmask)  # log2(0) = -inf when empty


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    # Program = (sequence, query head): log-sum-exp weighted sum of the split partials.
    s = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_POW2)
    d = tl.arange(0, HEAD_DIM)
    spmask = sp < NUM_SPLITS
    row = (s.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS
    lse = tl.load(mid_lse_ptr + row + sp, mask=spmask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights become 0, output 0
    w = tl.exp2(lse - m)
    o = tl.load(mid_o_ptr + (row + sp)[:, None] * HEAD_DIM + d[None, :], mask=spmask[:, None], other=0.0)
    w_sum = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    dst = out_ptr + s.to(tl.int64) * stride_ot + h * stride_oh + d
    tl.store(dst, res.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program = (query tile, sequence, query head). Keys come from the paged cache (already holding
    # this step's K/V), so a cached prefix, a chunked-prefill continuation and a q_len = 1 decode
    # token in a mixed batch are all the same case: queries are the last q_len context positions.
    mt = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    if mt * BLOCK_M >= q_len:  # grid is sized by max_query_len; shorter sequences exit here
        return
    ctx = tl.load(seq_lens_ptr + s)
    prefix = ctx - q_len
    kvh = h // GROUP

    i = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < q_len
    d = tl.arange(0, HEAD_DIM)
    tok = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=imask[:, None], other=0.0)
    qpos = prefix + i

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    # K is read transposed ([D, BLOCK_N], still contiguous along D) so QK^T is a plain tl.dot.
    kt_base = kvh * stride_cache_head + d[:, None]
    v_base = kvh * stride_cache_head + d[None, :]

    # Phase 1: keys strictly before the tile's first query position are visible to every row, so
    # whole BLOCK_N tiles there need no mask at all (the bulk of the work for long contexts).
    tile_first_pos = prefix + mt * BLOCK_M
    full_end = (tile_first_pos // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + n // BLOCK_SIZE)
        slot = blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        kt = tl.load(k_cache_ptr + slot[None, :] * stride_cache_slot + kt_base)
        qk = tl.dot(q, kt) * scale_log2
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] * stride_cache_slot + v_base)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Phase 2: the diagonal band, up to the last query row's own position, with the causal mask.
    # Its first tile starts at or below every row's position, so each row sees >= 1 key there and
    # m_new stays finite (rows past q_len are masked garbage that is never stored).
    hi = tl.minimum(ctx, prefix + tl.minimum((mt + 1) * BLOCK_M, q_len))
    for n0 in range(full_end, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=nmask, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        kt = tl.load(k_cache_ptr + slot[None, :] * stride_cache_slot + kt_base, mask=nmask[None, :], other=0.0)
        qk = tl.dot(q, kt) * scale_log2
        visible = (n[None, :] <= qpos[:, None]) & nmask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot[:, None] * stride_cache_slot + v_base, mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / l_i[:, None]
    dst = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=imask[:, None])


# ----------------------------------------------------------------------------------------------
# Host-side launchers. They only read shapes/strides and Python ints (never tensor values), so
# they are safe inside CUDA-graph capture.
# ----------------------------------------------------------------------------------------------

# A split shorter than this is not worth its partial write + merge read.
MIN_SPLIT_LEN = 128
MAX_SPLITS = 32


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split-K factor for decode so the grid holds ~4 resident programs per SM.

    A decode program is small (a few KB of registers/smem), so several share an SM; ~4 per SM keeps
    enough loads in flight to saturate HBM. Big batches already fill the machine (batch 256 x 8 kv
    heads = 2048 programs) and get 1 split: no partials, no merge kernel. `max_seq_len` may be a
    loose bound (max model length under CUDA graphs); it only caps the count, and the kernel sizes
    each split from the real seq_len, so extra splits cost one tiny empty program each.
    """
    base = num_seqs * num_kv_heads
    target = 4 * num_sms
    if base >= target:
        return 1
    useful = triton.cdiv(max(max_seq_len, 1), MIN_SPLIT_LEN)
    return max(1, min(triton.cdiv(target, base), useful, MAX_SPLITS))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), (
        "cache must be [num_blocks, block_size, kv_heads, head_dim] with contiguous slots"
    )
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    assert block_size & (block_size - 1) == 0 and head_dim & (head_dim - 1) == 0 and head_dim >= 16
    return block_size, head_dim


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k/v [T, kv_heads, head_dim] into the paged caches; slot -1 tokens are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(k_cache, v_cache)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.shape[2:] == k.shape[1:]
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
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
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """One new token per sequence (token s belongs to sequence s). Returns [S, num_heads, head_dim]."""
    num_seqs, num_heads, _ = q.shape
    block_size, head_dim = _check_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and group * num_kv_heads == num_heads and seq_lens.shape[0] == num_seqs
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    # 64 x 128 bf16 K and V tiles (32 KB per step) keep HBM busy without spilling registers.
    block_n = block_n or (64 if head_dim <= 128 else 32)
    if num_splits > 1:
        mid_o = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused by the NUM_SPLITS == 1 specialisation
    _decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, mid_o, mid_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        MIN_SPLIT_LEN=MIN_SPLIT_LEN if num_splits > 1 else 1,
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_POW2=triton.next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 1,
        )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Varlen causal attention of q [T, H, D] over the paged context (prefix + new tokens)."""
    num_tokens, num_heads, _ = q.shape
    block_size, head_dim = _check_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    # Long prompts: 128-row tiles (wgmma-sized on Hopper). Short/mixed batches: smaller tiles so a
    # q_len = 1 decode row does not drag a mostly-empty 128-row tile through the whole context.
    if block_m is None:
        block_m = 128 if max_query_len > 64 and head_dim <= 128 else 64 if max_query_len > 16 else 16
    block_n = block_n or (64 if head_dim <= 128 else 32)
    num_warps = num_warps or (8 if block_m >= 128 else 4)
    grid = (triton.cdiv(max(max_query_len, 1), block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out
