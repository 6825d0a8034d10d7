"""Triton kernels for paged attention: KV-cache store, split-K GQA decode, and varlen prefill.

Cache layout (per layer): k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim],
contiguous, so logical position n of a sequence lives at slot block_table[n // block_size] *
block_size + n % block_size, and one (slot, kv_head) row is head_dim contiguous elements. Every
kernel reads whole rows with `d = tl.arange(0, HEAD_DIM)` as the fastest axis, which Triton turns
into 16-byte vector accesses (row strides are multiples of 16 bytes and specialised as such).

All softmax math is fp32 in base 2: the launchers (triton_backend.py) pass scale * log2(e), so
`exp2` is used directly (one MUFU op, no extra multiply per score).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

FP8_MAX = tl.constexpr(448.0)  # largest finite float8 e4m3fn


@triton.jit
def narrow(x, dtype: tl.constexpr, SATURATE: tl.constexpr):
    """x in the cache's dtype. An fp8 cache saturates first: the GPU's narrowing can turn a value
    past +-448 into NaN, which would poison every later attention over it."""
    if SATURATE:
        return tl.clamp(x.to(tl.float32), -FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype -> fp32: the rounding a torch op in `dtype` applies to its (fp32-computed) result."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def norm_rope(x1, x2, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
    """Qwen3's per-head RMSNorm times its weight, then neox RoPE, of heads given as their two halves
    x1, x2 (fp32, [..., head_dim / 2], padding zero) with the weight's halves w1, w2 and the angles'
    cos / sin (already rounded to dtype). Rounds wherever the torch path (norm.py, rotary.py)
    rounds, every product and sum separately, so the launch must turn FMA contraction off
    (layers/fused.py says why). Returns the rotated halves in dtype."""
    ms = (tl.sum(x1 * x1, axis=-1, keep_dims=True) + tl.sum(x2 * x2, axis=-1, keep_dims=True)) / HEAD_DIM
    rstd = tl.rsqrt(ms + eps)
    y1 = round_to(w1.to(tl.float32) * round_to(x1 * rstd, dtype), dtype)
    y2 = round_to(w2.to(tl.float32) * round_to(x2 * rstd, dtype), dtype)
    out1 = (round_to(y1 * cos, dtype) - round_to(y2 * sin, dtype)).to(dtype)
    out2 = (round_to(y2 * cos, dtype) + round_to(y1 * sin, dtype)).to(dtype)
    return out1, out2


@triton.jit
def store_kvcache_kernel(
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
    SATURATE: tl.constexpr,
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
    tl.store(k_cache_ptr + dst, narrow(k, k_cache_ptr.dtype.element_ty, SATURATE), mask=mask)
    tl.store(v_cache_ptr + dst, narrow(v, v_cache_ptr.dtype.element_ty, SATURATE), mask=mask)


# Integers that change from step to step are not specialised: Triton would otherwise compile a
# variant per value class (== 1, multiple of 16, other), e.g. each time the block-table width of an
# eager step crosses a multiple of 16, a stall of about a second in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt"])
def decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    order_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    tickets_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slot_mapping_ptr,
    stride_cos,
    stride_sin,
    eps,
    GROUP: tl.constexpr,
    GROUP_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    ORDERED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    SATURATE: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    RELEASE: tl.constexpr,
    MIXED: tl.constexpr,
):
    # Program = (kv head, sequence, split). It serves all GROUP query heads that share this kv head,
    # so every K/V tile is fetched from HBM once per group instead of once per query head. The
    # group is padded to BLOCK_H (>= 16, tl.dot's minimum M): padded rows load q = 0 and are never
    # stored; the wasted MMA work is free because the kernel is bound by HBM reads, not FLOPs.
    kvh = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    # The split count is the grid's, not a constexpr: an eager step may pick any count up to
    # MAX_SPLITS from its sequences, and each would otherwise compile a variant of its own.
    num_splits = tl.num_programs(2)
    if ORDERED:
        # Programs start in grid order; taking the longest contexts first keeps a long sequence
        # from starting last and running alone while the other SMs idle at the end of the launch.
        s = tl.load(order_ptr + s)

    if MIXED:
        # A mixed step (prompt chunks beside decodes): sequence s's tokens start at query_start_loc[s],
        # and only one-token sequences are served here; the prefill kernel takes the others.
        row = tl.load(query_start_loc_ptr + s)
        if tl.load(query_start_loc_ptr + s + 1) - row != 1:
            return
    else:
        row = s  # pure decode: sequence s owns exactly token s of the flat batch
    row = row.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + s)
    # The split length is derived from the *actual* seq_len, so a grid sized for a loose bound
    # (max model length under CUDA graphs) still spreads real work evenly; surplus splits get an
    # empty range and only write a "no keys" partial (lse = -inf).
    split_len = tl.maximum(tl.cdiv(seq_len, num_splits), MIN_SPLIT_LEN)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    q_row = q_ptr + row * stride_qt
    if ROPE:
        q = _rope_and_store(
            q_row, heads, hmask, kvh, s, seq_len, start, end, k_cache_ptr, v_cache_ptr, q_weight_ptr, k_weight_ptr,
            cos_ptr, sin_ptr, positions_ptr, slot_mapping_ptr, stride_cos, stride_sin, stride_cache_slot,
            stride_cache_head, eps, BLOCK_H, HEAD_DIM, NUM_Q_HEADS, SATURATE,
        )  # fmt: skip
    else:
        q = tl.load(q_row + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None], other=0.0)
    if k_cache_ptr.dtype.element_ty.is_fp8() and q.dtype == tl.bfloat16:
        # fp8 widens to fp16 in one instruction per pair, to bf16 in several, and this loop is
        # bound by those conversions, not HBM. Normed query heads and softmax weights fit fp16.
        q = q.to(tl.float16)

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
        # .to(q.dtype): an fp8 cache is widened here, for the dots
        k = tl.load(k_cache_ptr + off, mask=nmask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + off, mask=nmask[:, None], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N] fp32
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        # Every iteration has >= 1 valid key, so m_new is finite and exp2 never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if RELEASE:
        # The kernel after (the o projection, launched with PDL) may start once every program is
        # here: it requests its weights while the partials are stored and merged. Its wait still
        # covers this whole kernel, so nothing it reads after the wait is stale.
        gdc_launch_dependents()

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # empty range (or seq_len 0 padding) -> zeros, not NaN
    o = acc / l_safe[:, None]
    if not SPLIT:
        dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        # Partials: mid_o [S, H, splits, D] normalised, mid_lse [S, H, splits] (base 2).
        part = (s.to(tl.int64) * (tl.num_programs(0) * GROUP) + heads) * num_splits + split
        tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=hmask[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # empty split: weight 0
        tl.store(mid_lse_ptr + part, lse, mask=hmask)
        if FUSED_MERGE:
            # The split of (sequence, kv head) that finishes last merges the group's partials, so no
            # merge kernel follows. Its ticket's release orders this program's partial stores (all
            # threads', after the barrier) before the count; the acquire of the last ticket makes
            # every split's partials visible to the merging program.
            tl.debug_barrier()
            ticket_ptr = tickets_ptr + s.to(tl.int64) * tl.num_programs(0) + kvh
            if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == num_splits - 1:
                tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")  # ready for the next launch
                # Only the group's real heads (BLOCK_H pads them for tl.dot): the merge's tiles stay small.
                mh = kvh * GROUP + tl.arange(0, GROUP_POW2)
                mh_ok = mh < (kvh + 1) * GROUP
                base = (s.to(tl.int64) * (tl.num_programs(0) * GROUP) + mh) * num_splits
                dst = out_ptr + row * stride_ot + mh[:, None] * stride_oh + d[None, :]
                active = tl.minimum(tl.cdiv(seq_len, split_len), num_splits)  # splits holding keys
                _merge_partials(mid_o_ptr, mid_lse_ptr, base, mh_ok, active, dst, HEAD_DIM, SPLITS_POW2, CHUNK=8)


@triton.jit
def _merge_partials(
    mid_o_ptr, mid_lse_ptr, base, hmask, active, dst,
    HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """The log-sum-exp weighted sum of split partials for a group of heads (rows `base` + split)
    over their first `active` splits (the rest are empty): the split kernel's fused merge, and
    decode_merge_kernel's for one head. CHUNK splits' partials are loaded at once, so their L2
    latencies overlap. Loads go through L2 (.cg): other programs wrote them."""
    d = tl.arange(0, HEAD_DIM)
    sp = tl.arange(0, SPLITS_POW2)
    lse = tl.load(
        mid_lse_ptr + base[:, None] + sp[None, :], mask=hmask[:, None] & (sp < active)[None, :],
        other=float("-inf"), cache_modifier=".cg",
    )  # fmt: skip
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights become 0, output 0
    w_sum = tl.sum(tl.exp2(lse - m[:, None]), 1)
    acc = tl.zeros([base.shape[0], HEAD_DIM], tl.float32)
    c = tl.arange(0, CHUNK)
    for c0 in range(0, active, CHUNK):
        rows = base[:, None] + c0 + c[None, :]  # [heads, CHUNK]
        ok = hmask[:, None] & (c0 + c < active)[None, :]
        w = tl.exp2(tl.load(mid_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg") - m[:, None])
        o = tl.load(mid_o_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        acc += tl.sum(o * w[:, :, None], 1)
    res = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
    tl.store(dst, res.to(dst.dtype.element_ty), mask=hmask[:, None])


@triton.jit
def _rope_and_store(
    qkv_row, heads, hmask, kvh, s, seq_len, start, end, k_cache_ptr, v_cache_ptr, q_weight_ptr, k_weight_ptr,
    cos_ptr, sin_ptr, positions_ptr, slot_mapping_ptr, stride_cos, stride_sin, stride_cache_slot, stride_cache_head,
    eps, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_Q_HEADS: tl.constexpr, SATURATE: tl.constexpr,
):  # fmt: skip
    """decode_split_kernel's ROPE prologue, which takes over the separate q/k-norm + RoPE + KV-store
    kernel of a decode step: from this token's raw qkv row, the program's query heads normed and
    rotated ([BLOCK_H, HEAD_DIM], returned), and, in the one program whose key range holds the new
    token, its key normed and rotated and its value written to the cache at its slot (-1: none)."""
    dtype = qkv_row.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2
    hd = tl.arange(0, HALF)
    pos = tl.load(positions_ptr + s)
    cos = round_to(tl.load(cos_ptr + pos * stride_cos + hd), dtype)
    sin = round_to(tl.load(sin_ptr + pos * stride_sin + hd), dtype)
    lo = qkv_row + heads[:, None] * HEAD_DIM + hd[None, :]
    q1 = tl.load(lo, mask=hmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(lo + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    w1, w2 = tl.load(q_weight_ptr + hd)[None, :], tl.load(q_weight_ptr + HALF + hd)[None, :]
    out1, out2 = norm_rope(q1, q2, w1, w2, cos[None, :], sin[None, :], eps, HEAD_DIM, dtype)
    # [BLOCK_H, HALF] x 2 -> [BLOCK_H, HALF, 2] -> [BLOCK_H, 2, HALF] -> [BLOCK_H, HEAD_DIM]: the halves side by side.
    q = tl.reshape(tl.permute(tl.join(out1, out2), (0, 2, 1)), (BLOCK_H, HEAD_DIM))
    new = seq_len - 1  # the new token's position in its sequence; padding rows (seq_len 0) store nothing
    slot = tl.load(slot_mapping_ptr + s).to(tl.int64)
    if (start <= new) & (new < end) & (slot >= 0):
        k_lo = qkv_row + (NUM_Q_HEADS + kvh) * HEAD_DIM + hd
        k1, k2 = tl.load(k_lo).to(tl.float32), tl.load(k_lo + HALF).to(tl.float32)
        wk1, wk2 = tl.load(k_weight_ptr + hd), tl.load(k_weight_ptr + HALF + hd)
        k1, k2 = norm_rope(k1, k2, wk1, wk2, cos, sin, eps, HEAD_DIM, dtype)
        cache = slot * stride_cache_slot + kvh * stride_cache_head + hd
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + cache, narrow(k1, cache_dtype, SATURATE))
        tl.store(k_cache_ptr + cache + HALF, narrow(k2, cache_dtype, SATURATE))
        v_lo = qkv_row + (NUM_Q_HEADS + tl.num_programs(0) + kvh) * HEAD_DIM + hd  # values follow the keys
        tl.store(v_cache_ptr + cache, narrow(tl.load(v_lo), cache_dtype, SATURATE))
        tl.store(v_cache_ptr + cache + HALF, narrow(tl.load(v_lo + HALF), cache_dtype, SATURATE))
    # The key loop reads that slot back (through the cache, so in the cache's dtype, as the
    # unfused path does): the barrier makes this CTA's stores visible to all its threads first.
    tl.debug_barrier()
    return q


@triton.jit
def decode_merge_kernel(
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
    # Program = (sequence, query head): the split kernel's fused merge for one head, all splits at once.
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) + tl.arange(0, 1)  # a one-head group
    dst = out_ptr + s * stride_ot + h[:, None] * stride_oh + tl.arange(0, HEAD_DIM)[None, :]
    base = (s * NUM_HEADS + h) * NUM_SPLITS
    _merge_partials(mid_o_ptr, mid_lse_ptr, base, h < NUM_HEADS, NUM_SPLITS, dst, HEAD_DIM, SPLITS_POW2, SPLITS_POW2)


@triton.jit
def _key_rows(bt_row, q_start, n, mask, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Row index (int64) of context positions n in the K/V source: a cache slot when PAGED, else a
    row of the flat new-token k/v (prefill from scratch: context == the sequence's own tokens)."""
    if PAGED:
        # Masked-off lanes get undefined block ids; callers mask the K/V loads with the same mask.
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=mask)
        return blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
    else:
        return (q_start + n).to(tl.int64)


@triton.jit(do_not_specialize=["min_q_len", "max_q_len", "num_seqs", "stride_bt"])
def prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2,
    min_q_len,
    max_q_len,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    stride_bt,
    stride_ot,
    stride_oh,
    PAGED: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr,
):
    # Program = (query head, slot). PAGED: keys come from the cache (already holding
    # this step's K/V), so a cached prefix, a chunked-prefill continuation and a q_len = 1 decode
    # token in a mixed batch are all one case: queries are the last q_len context positions.
    # Not PAGED (no sequence has a prefix): keys are read straight from the new k/v, which is
    # contiguous (no block-table gather) and works before the cache exists (warm-up).
    # Heads vary fastest in the grid: the GROUP query heads sharing a kv head run back to back, so
    # their repeated K/V reads mostly hit L2.
    # Not PACKED (every sequence served fits one tile): slot s is sequence s. PACKED: sequence s owns
    # the slots from query_start_loc[s] // BLOCK_M + s on, at least one per query tile it needs and
    # at most one more, so the grid (tokens // BLOCK_M + sequences slots) holds few programs with no
    # tile, where a grid of max_query_len's tiles for every sequence would give each decode row of a
    # mixed step, or each short prompt beside a long one, programs that only exit.
    h = tl.program_id(0)
    slot = tl.program_id(1)
    if PACKED:
        # s = the last sequence whose first slot is <= slot (first slots only grow with s)
        s = tl.full([], -1, tl.int32)
        for c0 in range(0, num_seqs, 256):
            ss = c0 + tl.arange(0, 256)
            starts = tl.load(query_start_loc_ptr + ss, mask=ss < num_seqs, other=0)
            s += tl.sum(((starts // BLOCK_M + ss <= slot) & (ss < num_seqs)).to(tl.int32), 0)
        q_start = tl.load(query_start_loc_ptr + s)
        mt = slot - (q_start // BLOCK_M + s)
    else:
        s = slot
        mt = 0
        q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    # Slots past a sequence's last tile exit here, and so do sequences outside [min_q_len,
    # max_q_len] (the launch covering another q_len class has them).
    if (mt * BLOCK_M >= q_len) | (q_len < min_q_len) | (q_len > max_q_len):
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
    kt_base = k_ptr + kvh * stride_k_head + d[:, None]
    v_base = v_ptr + kvh * stride_v_head + d[None, :]

    # Phase 1: keys strictly before the tile's first query position are visible to every row, so
    # whole BLOCK_N tiles there need no mask at all (the bulk of the work for long contexts).
    full_end = ((prefix + mt * BLOCK_M) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        rows = _key_rows(bt_row, q_start, n, None, PAGED, BLOCK_SIZE)
        kt = tl.load(kt_base + rows[None, :] * stride_k_row).to(q.dtype)  # widens an fp8 cache
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_v_row).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Phase 2: the diagonal band, up to the last query row's own position, with the causal mask.
    # Its first tile starts at or below every row's position, so each row sees >= 1 key there and
    # m_new stays finite (rows past q_len are masked garbage that is never stored).
    hi = tl.minimum(ctx, prefix + tl.minimum((mt + 1) * BLOCK_M, q_len))
    for n0 in range(full_end, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        rows = _key_rows(bt_row, q_start, n, nmask, PAGED, BLOCK_SIZE)
        kt = tl.load(kt_base + rows[None, :] * stride_k_row, mask=nmask[None, :], other=0.0).to(q.dtype)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        qk = tl.where((n[None, :] <= qpos[:, None]) & nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_v_row, mask=nmask[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    dst = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=imask[:, None])
