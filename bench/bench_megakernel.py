"""Is one persistent kernel for all of a one-row decode step's layers faster than the kernel chain it
replaces?

    PYTHONPATH=. python3 bench/bench_megakernel.py [--context 512] [--warps 8,16] [--ahead 0,1,2]
                                                   [--poll 0,1] [--seconds 0]

The chain (as served for a single request): per layer the qkv GEMV with the RMSNorm fused in, decode
attention with the q/k norm, RoPE and KV store (its o projection released early), the o GEMV, the
gate_up GEMV with the add + RMSNorm, the down GEMV with SiLU: five kernels a layer, each launched with
PDL so it requests its weights while the one before drains (layers/gemv.py). The experiment,
`layers_kernel`: all 28 layers as one launch of a program per SM, the same five phases split by
grid-wide barriers, a program's share of a phase's weights held in registers and requested a whole
phase early (AHEAD=2: before the phase before it computes; 1: after that phase computes, before the
barrier, what PDL gives the chain; 0: after the barrier). POLL picks how a barrier polls. It runs over
stacked random weights of Qwen3-0.6B's shape and one sequence's paged cache; its outputs (last hidden
state and residual) are compared with the chain's, and the fastest configuration is timed again inside
a CUDA graph, as a served step would launch it. `--tiny` checks it against the chain on a two-layer
fp32 stack under the interpreter (TRITON_INTERPRET=1), phase by phase.

The answer so far is no, and the lab notes (runs BA-BC) say why: the chain is faster, as was a version
streaming the weights through shared memory with Triton's pipeliner even before its barriers.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from bench.timing import copy_bandwidth, graph_us
from worker_svc.attention.triton_kernels import _merge_partials, norm_rope, round_to
from worker_svc.layers.gemv import NORM, _input, _rstd

NORM_PROLOGUE = tl.constexpr(NORM)  # a jit function reads module globals only as constexprs


@triton.jit
def _grid_sync(counter_ptr, target, POLL: tl.constexpr):
    # Every program arrives after its own stores (release), then waits for all (acquire). POLL 0 polls
    # with atomics (each an acquire); 1 with plain volatile loads, then one acquire fence.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    if POLL == 0:
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
    else:
        while tl.load(counter_ptr, volatile=True) < target:
            pass
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _norm_input(x_ptr, res_ptr, res_out_ptr, w_ptr, pid, eps, H: tl.constexpr):
    # RMSNorm(x + residual) * w, as the chain's one-row GEMVs compute and round their NORM prologue
    # (program 0 stores x + residual).
    ks = tl.arange(0, H)
    rstd = _rstd(x_ptr, res_ptr, res_out_ptr, pid, H, eps, NORM_PROLOGUE, True, H)
    return _input(x_ptr, res_ptr, w_ptr, ks, ks < H, rstd, H, NORM_PROLOGUE, True)


@triton.jit
def _w_qkv(w_ptr, layer, pid, H: tl.constexpr, QKV: tl.constexpr, P: tl.constexpr):
    RA: tl.constexpr = QKV // P
    rows = pid * RA + tl.arange(0, RA)
    return tl.load(w_ptr + layer * QKV * H + rows[:, None] * H + tl.arange(0, H)[None, :])


@triton.jit
def _w_o(w_ptr, layer, pid, H: tl.constexpr, NHD: tl.constexpr, P: tl.constexpr):
    RO: tl.constexpr = H // P
    rows = pid * RO + tl.arange(0, RO)
    return tl.load(w_ptr + layer * H * NHD + rows[:, None] * NHD + tl.arange(0, NHD)[None, :])


@triton.jit
def _w_gate_up(w_ptr, layer, pid, i: tl.constexpr, H: tl.constexpr, INTER: tl.constexpr, P: tl.constexpr):
    # Tile i of the program's three: 8 gate rows and the 8 up rows that pair with them, [2, 8, H].
    g0 = (pid * 3 + i) * 8
    rows = tl.arange(0, 2)[:, None] * INTER + g0 + tl.arange(0, 8)[None, :]
    ks = tl.arange(0, H)
    return tl.load(w_ptr + layer * 2 * INTER * H + rows[:, :, None] * H + ks[None, None, :])


@triton.jit
def _w_down(w_ptr, layer, pid, c: tl.constexpr, H: tl.constexpr, INTER: tl.constexpr, P: tl.constexpr):
    # Chunk c of the program's rows of down, [H / P, INTER / 3].
    RO: tl.constexpr = H // P
    C3: tl.constexpr = INTER // 3
    rows = pid * RO + tl.arange(0, RO)
    ks = c * C3 + tl.arange(0, C3)
    return tl.load(w_ptr + layer * H * INTER + rows[:, None] * INTER + ks[None, :])


@triton.jit
def _w3(w_ptr, layer, pid, DOWN: tl.constexpr, H: tl.constexpr, INTER: tl.constexpr, P: tl.constexpr):
    # A program's three gate/up tiles, or its three chunks of down.
    if DOWN:
        t0 = _w_down(w_ptr, layer, pid, 0, H, INTER, P)
        t1 = _w_down(w_ptr, layer, pid, 1, H, INTER, P)
        t2 = _w_down(w_ptr, layer, pid, 2, H, INTER, P)
    else:
        t0 = _w_gate_up(w_ptr, layer, pid, 0, H, INTER, P)
        t1 = _w_gate_up(w_ptr, layer, pid, 1, H, INTER, P)
        t2 = _w_gate_up(w_ptr, layer, pid, 2, H, INTER, P)
    return t0, t1, t2


@triton.jit
def _gemv_store(w, a, out_ptr, first, N: tl.constexpr):
    acc = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + first + tl.arange(0, N), acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _kv_first(
    layer, pid, seq_len, k_cache_ptr, v_cache_ptr, bt_ptr, stride_cl, stride_cs, stride_ch,
    KVH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # The first K/V tile of the program's split, all but the new token's row (not stored yet): it
    # needs nothing of this step, so it can be requested before the qkv phase's barrier.
    S: tl.constexpr = P // KVH
    kvh = pid % KVH
    split_len = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    start = (pid // KVH) * split_len
    n = start + tl.arange(0, BLOCK_N)
    ok = n < tl.minimum(start + split_len, seq_len - 1)
    blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=ok, other=0)
    off = (blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_cs + kvh * stride_ch
    off += tl.arange(0, D)[None, :]
    k = tl.load(k_cache_ptr + layer * stride_cl + off, mask=ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + layer * stride_cl + off, mask=ok[:, None], other=0.0)
    return k, v


@triton.jit
def _attention(
    layer, pid, qkv_ptr, attn_ptr, mid_o_ptr, mid_lse_ptr, tickets_ptr, qn_ptr, kn_ptr, k_cache_ptr, v_cache_ptr,
    bt_ptr, seq_len, pos, slot, cos_ptr, sin_ptr, stride_cos, stride_cl, stride_cs, stride_ch, eps, scale_log2, k0, v0,
    NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # Program = (kv head, split) of the one sequence; the last split of a kv head to finish merges.
    # k0, v0: _kv_first's tile, to which the new token's key and value are added here.
    dtype = qkv_ptr.dtype.element_ty
    G: tl.constexpr = NH // KVH
    S: tl.constexpr = P // KVH
    BLOCK_H: tl.constexpr = 16
    HALF: tl.constexpr = D // 2
    QKV: tl.constexpr = (NH + 2 * KVH) * D
    kvh = pid % KVH
    split = pid // KVH
    split_len = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    row = qkv_ptr + layer * QKV
    hd = tl.arange(0, HALF)
    d = tl.arange(0, D)
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < G
    heads = kvh * G + hh
    cos = round_to(tl.load(cos_ptr + pos * stride_cos + hd), dtype)
    sin = round_to(tl.load(sin_ptr + pos * stride_cos + hd), dtype)
    lo = row + heads[:, None] * D + hd[None, :]
    q1 = tl.load(lo, mask=hmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(lo + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    qw = qn_ptr + layer * D
    o1, o2 = norm_rope(q1, q2, tl.load(qw + hd)[None, :], tl.load(qw + HALF + hd)[None, :], cos[None, :],
                       sin[None, :], eps, D, dtype)  # fmt: skip
    q = tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), (BLOCK_H, D))
    kc = k_cache_ptr + layer * stride_cl
    vc = v_cache_ptr + layer * stride_cl
    new = seq_len - 1
    kw = kn_ptr + layer * D
    k_lo = row + (NH + kvh) * D + hd
    k1, k2 = norm_rope(tl.load(k_lo).to(tl.float32), tl.load(k_lo + HALF).to(tl.float32), tl.load(kw + hd),
                       tl.load(kw + HALF + hd), cos, sin, eps, D, dtype)  # fmt: skip
    v_new = tl.load(row + (NH + KVH + kvh) * D + d)
    mine = (start <= new) & (new < end)
    at = slot * stride_cs + kvh * stride_ch + hd
    tl.store(kc + at, k1, mask=mine & (hd < HALF))
    tl.store(kc + at + HALF, k2, mask=mine & (hd < HALF))
    tl.store(vc + slot * stride_cs + kvh * stride_ch + d, v_new, mask=mine & (d < D))
    tl.debug_barrier()
    # The first tile from registers, the new token's row put in; later tiles read back from the cache.
    n = start + tl.arange(0, BLOCK_N)
    is_new = (n == new)[:, None]
    k = tl.where(is_new, tl.reshape(tl.permute(tl.join(k1, k2), (1, 0)), (D,))[None, :], k0)
    v = tl.where(is_new, v_new[None, :], v0)
    qk = tl.dot(q, tl.trans(k)) * scale_log2
    qk = tl.where((n < end)[None, :], qk, float("-inf"))
    m_i = tl.maximum(tl.max(qk, 1), -1e30)  # an empty split keeps a finite max: its weights are zero
    p = tl.exp2(qk - m_i[:, None])
    l_i = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=nmask, other=0)
        off = (blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        k = tl.load(kc + off, mask=nmask[:, None], other=0.0)
        v = tl.load(vc + off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = heads * S + split
    mid_o = mid_o_ptr + layer * NH * S * D
    mid_lse = mid_lse_ptr + layer * NH * S
    tl.store(mid_o + part[:, None] * D + d[None, :], acc / l_safe[:, None], mask=hmask[:, None])
    tl.store(mid_lse + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=hmask)
    tl.debug_barrier()
    ticket = tickets_ptr + layer * KVH + kvh
    if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == S - 1:
        tl.atomic_xchg(ticket, 0, sem="relaxed")
        mh = kvh * G + tl.arange(0, G)
        dst = attn_ptr + layer * NH * D + mh[:, None] * D + d[None, :]
        active = tl.minimum(tl.cdiv(seq_len, split_len), S)
        _merge_partials(mid_o, mid_lse, mh * S, mh < NH, active, dst, D, S, 8)


@triton.jit
def _mlp_in(w0, w1, w2, a, pid, act_ptr, INTER: tl.constexpr):
    # gate_up of the three tiles, then silu(gate) * up, rounded as the chain's down prologue rounds it.
    dtype = act_ptr.dtype.element_ty
    j = tl.arange(0, 2)[:, None]
    r = tl.arange(0, 8)
    for i in tl.static_range(3):
        w = w0 if i == 0 else (w1 if i == 1 else w2)
        gu = round_to(tl.sum(w.to(tl.float32) * a[None, None, :], axis=2), dtype)  # [2, 8]
        g = tl.sum(tl.where(j == 0, gu, 0.0), axis=0)
        u = tl.sum(tl.where(j == 1, gu, 0.0), axis=0)
        act = round_to(round_to(g / (1.0 + tl.exp(-g)), dtype) * u, dtype)
        tl.store(act_ptr + (pid * 3 + i) * 8 + r, act.to(dtype))


@triton.jit
def _down(w0, w1, w2, act_ptr, out_ptr, pid, H: tl.constexpr, INTER: tl.constexpr, P: tl.constexpr):
    C3: tl.constexpr = INTER // 3
    RO: tl.constexpr = H // P
    acc = tl.zeros([RO], tl.float32)
    for c in tl.static_range(3):
        w = w0 if c == 0 else (w1 if c == 1 else w2)
        a = tl.load(act_ptr + c * C3 + tl.arange(0, C3)).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + pid * RO + tl.arange(0, RO), acc.to(out_ptr.dtype.element_ty))


@triton.jit
def layers_kernel(
    h_ptr, r1_ptr, r2_ptr, qkv_ptr, attn_ptr, o_ptr, act_ptr, mid_o_ptr, mid_lse_ptr, tickets_ptr, counter_ptr,
    wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, ln1_ptr, ln2_ptr, qn_ptr, kn_ptr, k_cache_ptr, v_cache_ptr, bt_ptr,
    seq_len_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cos, stride_cl, stride_cs, stride_ch,
    layer_lo, layer_hi, eps, scale_log2,
    H: tl.constexpr, NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, AHEAD: tl.constexpr, PHASE: tl.constexpr,
    POLL: tl.constexpr,
):  # fmt: skip
    """Layers [layer_lo, layer_hi) of one row. Activations have a slot per layer (h: [L + 1, H], h[0] the
    embedding, h[l + 1] layer l's MLP output; r2 likewise the residual entering each layer, r2[0] zero;
    r1[l] the residual after attention), so no program reads a line another wrote in an earlier phase
    through a stale L1. PHASE >= 0 runs that one phase of layer_lo and no barrier: the interpreter runs
    programs one after another, so a grid barrier there would never open."""
    pid = tl.program_id(0)
    NHD: tl.constexpr = NH * D
    QKV: tl.constexpr = (NH + 2 * KVH) * D
    ALL: tl.constexpr = PHASE < 0
    SYNC: tl.constexpr = PHASE == -1  # -2: every phase without barriers (wrong results: a timing bound)
    seq_len = tl.load(seq_len_ptr)
    pos = tl.load(pos_ptr)
    slot = tl.load(slot_ptr).to(tl.int64)
    if ALL and AHEAD > 0:
        wa = _w_qkv(wqkv_ptr, layer_lo, pid, H, QKV, P)
    n = 0
    for layer in range(layer_lo, layer_hi):
        following = tl.minimum(layer + 1, layer_hi - 1)
        if ALL or PHASE == 0:  # qkv, with the add + RMSNorm
            if AHEAD == 0 or not ALL:
                wa = _w_qkv(wqkv_ptr, layer, pid, H, QKV, P)
            if ALL and AHEAD == 2:
                k0, v0 = _kv_first(layer, pid, seq_len, k_cache_ptr, v_cache_ptr, bt_ptr, stride_cl, stride_cs,
                                   stride_ch, KVH, D, P, BLOCK_N, BLOCK_SIZE)  # fmt: skip
            a = _norm_input(h_ptr + layer * H, r2_ptr + layer * H, r1_ptr + layer * H, ln1_ptr + layer * H, pid, eps, H)
            _gemv_store(wa, a, qkv_ptr + layer * QKV, pid * (QKV // P), QKV // P)
            if ALL and AHEAD == 1:
                k0, v0 = _kv_first(layer, pid, seq_len, k_cache_ptr, v_cache_ptr, bt_ptr, stride_cl, stride_cs,
                                   stride_ch, KVH, D, P, BLOCK_N, BLOCK_SIZE)  # fmt: skip
        if SYNC:
            n += P
            _grid_sync(counter_ptr, n, POLL)
        if ALL or PHASE == 1:  # attention
            if AHEAD == 0 or not ALL:
                k0, v0 = _kv_first(layer, pid, seq_len, k_cache_ptr, v_cache_ptr, bt_ptr, stride_cl, stride_cs,
                                   stride_ch, KVH, D, P, BLOCK_N, BLOCK_SIZE)  # fmt: skip
            if ALL and AHEAD == 2:
                wo = _w_o(wo_ptr, layer, pid, H, NHD, P)
            _attention(
                layer, pid, qkv_ptr, attn_ptr, mid_o_ptr, mid_lse_ptr, tickets_ptr, qn_ptr, kn_ptr, k_cache_ptr,
                v_cache_ptr, bt_ptr, seq_len, pos, slot, cos_ptr, sin_ptr, stride_cos, stride_cl, stride_cs, stride_ch,
                eps, scale_log2, k0, v0, NH, KVH, D, P, BLOCK_N, BLOCK_SIZE,
            )  # fmt: skip
            if ALL and AHEAD == 1:
                wo = _w_o(wo_ptr, layer, pid, H, NHD, P)
        if SYNC:
            n += P
            _grid_sync(counter_ptr, n, POLL)
        if ALL or PHASE == 2:  # o
            if AHEAD == 0 or not ALL:
                wo = _w_o(wo_ptr, layer, pid, H, NHD, P)
            if ALL and AHEAD == 2:
                wg0, wg1, wg2 = _w3(wgu_ptr, layer, pid, False, H, INTER, P)
            a = tl.load(attn_ptr + layer * NHD + tl.arange(0, NHD)).to(tl.float32)
            _gemv_store(wo, a, o_ptr + layer * H, pid * (H // P), H // P)
            if ALL and AHEAD == 1:
                wg0, wg1, wg2 = _w3(wgu_ptr, layer, pid, False, H, INTER, P)
        if SYNC:
            n += P
            _grid_sync(counter_ptr, n, POLL)
        if ALL or PHASE == 3:  # gate_up with the add + RMSNorm, then silu(gate) * up
            if AHEAD == 0 or not ALL:
                wg0, wg1, wg2 = _w3(wgu_ptr, layer, pid, False, H, INTER, P)
            if ALL and AHEAD == 2:
                wd0, wd1, wd2 = _w3(wd_ptr, layer, pid, True, H, INTER, P)
            a = _norm_input(o_ptr + layer * H, r1_ptr + layer * H, r2_ptr + (layer + 1) * H, ln2_ptr + layer * H,
                            pid, eps, H)  # fmt: skip
            _mlp_in(wg0, wg1, wg2, a, pid, act_ptr + layer * INTER, INTER)
            if ALL and AHEAD == 1:
                wd0, wd1, wd2 = _w3(wd_ptr, layer, pid, True, H, INTER, P)
        if SYNC:
            n += P
            _grid_sync(counter_ptr, n, POLL)
        if ALL or PHASE == 4:  # down
            if AHEAD == 0 or not ALL:
                wd0, wd1, wd2 = _w3(wd_ptr, layer, pid, True, H, INTER, P)
            if ALL and AHEAD == 2:
                wa = _w_qkv(wqkv_ptr, following, pid, H, QKV, P)
            _down(wd0, wd1, wd2, act_ptr + layer * INTER, h_ptr + (layer + 1) * H, pid, H, INTER, P)
            if ALL and AHEAD == 1:
                wa = _w_qkv(wqkv_ptr, following, pid, H, QKV, P)
        if SYNC:
            n += P
            _grid_sync(counter_ptr, n, POLL)
    if SYNC:  # noqa: SIM102  (a compile-time test around a run-time one)
        # The last program through resets the barrier for the next launch (a graph replays it).
        if tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
            tl.atomic_xchg(counter_ptr + 1, 0, sem="relaxed")


class Stack:
    """Random weights of `layers` Qwen3 layers, stacked per kind, one sequence's paged cache, and the
    step's inputs: what both the chain and the persistent kernel read."""

    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 context: int, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim = layers, hidden, heads, kv_heads, head_dim
        self.inter, self.eps = inter, 1e-6
        qkv = (heads + 2 * kv_heads) * head_dim
        self.wqkv = rnd(layers, qkv, hidden, scale=hidden**-0.5)
        self.wo = rnd(layers, hidden, heads * head_dim, scale=(heads * head_dim) ** -0.5)
        self.wgu = rnd(layers, 2 * inter, hidden, scale=hidden**-0.5)
        self.wd = rnd(layers, hidden, inter, scale=inter**-0.5)
        self.ln1, self.ln2 = 1 + rnd(layers, hidden, scale=0.1), 1 + rnd(layers, hidden, scale=0.1)
        self.qn, self.kn = 1 + rnd(layers, head_dim, scale=0.1), 1 + rnd(layers, head_dim, scale=0.1)
        self.block = 16
        blocks = -(-(context + 1) // self.block)
        cache = (layers, blocks + 3, self.block, kv_heads, head_dim)
        self.k_cache, self.v_cache = rnd(*cache), rnd(*cache)
        perm = torch.randperm(blocks + 3, generator=g)[:blocks]
        self.block_table = perm.to(torch.int32).view(1, -1).to(device)
        self.seq_lens = torch.tensor([context], dtype=torch.int32, device=device)
        self.positions = torch.tensor([context - 1], dtype=torch.int64, device=device)
        last = context - 1
        slot = int(perm[last // self.block]) * self.block + last % self.block
        self.slot = torch.tensor([slot], dtype=torch.int64, device=device)
        inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(context + 16, dtype=torch.float32), inv)
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)
        self.embedding = rnd(1, hidden)
        self.scale = head_dim**-0.5


def chain(st: Stack) -> tuple[torch.Tensor, torch.Tensor]:
    """The served one-row path, layer by layer: (last MLP output, residual)."""
    from worker_svc.attention import triton_backend as tb
    from worker_svc.attention.backend import QKNormRope
    from worker_svc.layers import pdl
    from worker_svc.layers.gemv import NORM, SILU, gemv

    if not hasattr(st, "tickets"):
        st.tickets = torch.zeros(1 << 16, dtype=torch.int32, device=st.embedding.device)
    splits = min(tb.choose_num_splits(1, st.kv_heads, 4096, tb.device_num_sms(st.embedding.device)),
                 tb.ONE_SEQ_MAX_SPLITS)  # fmt: skip
    hidden, residual = st.embedding, None
    for i in range(st.layers):
        qkv, residual = gemv(hidden, st.wqkv[i], NORM, residual, st.ln1[i], st.eps)
        q = qkv[:, : st.heads * st.head_dim].view(1, st.heads, st.head_dim)
        rope = QKNormRope(st.qn[i], st.kn[i], st.cos, st.sin, st.positions, st.eps)
        out = tb.decode_attention(
            q, st.k_cache[i], st.v_cache[i], st.block_table, st.seq_lens, st.scale, splits, rope=rope,
            slot_mapping=st.slot, tickets=st.tickets, block_n=tb.ONE_SEQ_BLOCK_N, release=pdl.enabled(qkv),
        )  # fmt: skip
        o = gemv(out.view(1, -1), st.wo[i])[0]
        gate_up, residual = gemv(o, st.wgu[i], NORM, residual, st.ln2[i], st.eps)
        hidden = gemv(gate_up, st.wd[i], SILU)[0]
    assert residual is not None
    return hidden, residual


class Persistent:
    """The persistent kernel's buffers and launcher over a Stack."""

    def __init__(self, st: Stack, programs: int, ahead: int, warps: int, block_n: int = 32, poll: int = 0) -> None:
        dev, dt, n, h = st.embedding.device, st.embedding.dtype, st.layers, st.hidden
        qkv = (st.heads + 2 * st.kv_heads) * st.head_dim
        assert qkv % programs == 0 and h % programs == 0 and st.inter % (24 * programs) == 0
        assert programs % st.kv_heads == 0
        self.st, self.programs, self.ahead, self.warps, self.block_n = st, programs, ahead, warps, block_n
        self.poll = poll
        self.h = torch.zeros(n + 1, h, dtype=dt, device=dev)
        self.r1 = torch.zeros(n, h, dtype=dt, device=dev)
        self.r2 = torch.zeros(n + 1, h, dtype=dt, device=dev)
        self.qkv = torch.zeros(n, qkv, dtype=dt, device=dev)
        self.attn = torch.zeros(n, st.heads * st.head_dim, dtype=dt, device=dev)
        self.o = torch.zeros(n, h, dtype=dt, device=dev)
        self.act = torch.zeros(n, st.inter, dtype=dt, device=dev)
        splits = programs // st.kv_heads
        self.mid_o = torch.zeros(n, st.heads, splits, st.head_dim, dtype=torch.float32, device=dev)
        self.mid_lse = torch.zeros(n, st.heads, splits, dtype=torch.float32, device=dev)
        self.tickets = torch.zeros(n * st.kv_heads, dtype=torch.int32, device=dev)
        self.counter = torch.zeros(2, dtype=torch.int32, device=dev)  # the barrier's arrivals, its leavers

    def __call__(self, phased: bool = False, sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.st
        self.h[0].copy_(st.embedding[0])
        args = (
            self.h, self.r1, self.r2, self.qkv, self.attn, self.o, self.act, self.mid_o, self.mid_lse, self.tickets,
            self.counter, st.wqkv, st.wo, st.wgu, st.wd, st.ln1, st.ln2, st.qn, st.kn, st.k_cache, st.v_cache,
            st.block_table, st.seq_lens, st.positions, st.slot, st.cos, st.sin, st.cos.stride(0),
            st.k_cache.stride(0), st.k_cache.stride(2), st.k_cache.stride(3),
        )  # fmt: skip
        consts = dict(
            H=st.hidden, NH=st.heads, KVH=st.kv_heads, D=st.head_dim, INTER=st.inter, P=self.programs,
            BLOCK_N=self.block_n, BLOCK_SIZE=st.block, AHEAD=self.ahead, POLL=self.poll, num_warps=self.warps,
            num_stages=1, enable_fp_fusion=False,
        )  # fmt: skip
        grid = (self.programs,)
        scale = st.scale * 1.4426950408889634
        if phased:  # the interpreter: one phase of one layer a launch, no barriers
            for i in range(st.layers):
                for phase in range(5):
                    layers_kernel[grid](*args, i, i + 1, st.eps, scale, PHASE=phase, **consts)
        else:
            extra = {"launch_cooperative_grid": True} if st.embedding.is_cuda else {}
            layers_kernel[grid](*args, 0, st.layers, st.eps, scale, PHASE=-1 if sync else -2, **consts, **extra)
        return self.h[st.layers].view(1, -1), self.r2[st.layers].view(1, -1)


def eager_us(fn: object, reps: int = 200) -> float:
    """Mean µs of back-to-back launches of fn (one kernel: its launch overlaps the one before)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--ahead", default="0,1,2", help="where the kernel requests a phase's weights")
    p.add_argument("--warps", default="8,16")
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--poll", default="0,1", help="barrier polls: 0 atomics, 1 volatile loads and a fence")
    p.add_argument("--seconds", type=float, default=0, help="try no configuration after this many (0: no limit)")
    p.add_argument("--tiny", action="store_true", help="a tiny fp32 stack (CPU, the interpreter: TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.tiny:
        from tests.triton_interpreter import fix_interpreter

        fix_interpreter()
        context = args.context if args.context < 100 else 45
        st = Stack(2, 128, 4, 2, 32, 192, context, torch.float32, torch.device("cpu"))
        ref = chain(st)
        for block_n in (16, 8):  # one tile a split, and several
            got = Persistent(st, 8, 0, 4, block_n)(phased=True)
            print(f"tiny: hidden rel err {rel_err(got[0], ref[0]):.2e}, residual {rel_err(got[1], ref[1]):.2e}")
        return
    dev = torch.device("cuda")
    st = Stack(28, 1024, 16, 8, 128, 3072, args.context, torch.bfloat16, dev)
    ref = [t.clone() for t in chain(st)]
    chain_us = graph_us([lambda: chain(st)])
    floor = 28 * sum(w[0].numel() * 2 for w in (st.wqkv, st.wo, st.wgu, st.wd)) / copy_bandwidth() * 1e6
    print(f"chain (5 kernels a layer, PDL): {chain_us:.1f} us for 28 layers, {chain_us / 28:.2f} a layer; "
          f"the weights' floor {floor:.1f} us", flush=True)  # fmt: skip
    timed: list[tuple[float, str, Persistent]] = []
    deadline = time.monotonic() + (args.seconds or math.inf)
    for ahead in map(int, args.ahead.split(",")):
        for warps in map(int, args.warps.split(",")):
            for poll in map(int, args.poll.split(",")):
                name = f"persistent ahead {ahead} warps {warps} poll {poll}"
                build = functools.partial(Persistent, st, 128, ahead, warps, args.block_n, poll)
                if result := report(name, build, ref, chain_us, deadline):
                    timed.append(result)
    if timed:  # served, the fastest would be one node of the step's graph: its cooperative launch captured
        us, name, run = min(timed, key=lambda t: t[0])
        try:
            in_graph = graph_us([run])  # its replays leave their result in the buffers
            err = rel_err(run.h[st.layers].view(1, -1), ref[0])
            print(f"{name} in a CUDA graph: {in_graph:.1f} us (eager {us:.1f}), rel err hidden {err:.1e}")
        except Exception as e:
            print(f"{name} in a CUDA graph: {type(e).__name__}: {str(e)[:200]}")


def report(
    name: str,
    build: Callable[[], Persistent],
    ref: tuple[torch.Tensor, torch.Tensor],
    chain_us: float,
    deadline: float,
) -> tuple[float, str, Persistent] | None:
    """Times one kernel configuration (with its barriers, then without: a bound, its results wrong), prints
    it against the chain and returns its time, name and launcher (None if it does not build or launch, or
    the deadline has passed)."""
    if time.monotonic() > deadline:
        print(f"{name}: not tried (--seconds)")
        return None
    try:
        run = build()
        got = run()
        torch.cuda.synchronize()
        err = (rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))
        us = eager_us(run)  # one kernel: back-to-back launches hide the launch, as a graph would
        bound = eager_us(lambda: run(sync=False))
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        return None
    print(
        f"{name}: {us:.1f} us, {us / 28:.2f} a layer ({chain_us / us:.2f}x); without barriers {bound:.1f} us; "
        f"rel err hidden {err[0]:.1e} residual {err[1]:.1e}",
        flush=True,
    )
    return us, name, run


if __name__ == "__main__":
    main()
