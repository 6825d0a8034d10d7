"""Triton kernels for the elementwise work between a decoder layer's matmuls, and their launchers.

In plain torch a decoder layer launches ~60 tiny kernels (an RMSNorm alone is ~7: cast, pow, mean,
rsqrt, mul, cast, mul). Here each step is one launch that reads its inputs once:
  - add_rms_norm: residual add + RMSNorm of a sublayer's input (and of the final hidden states);
  - qk_norm_rope: Qwen3's per-head RMSNorm of queries and keys, then RoPE, in place on the qkv output,
    and, given the paged KV caches, the store of the new keys and values into them;
  - silu_and_mul: the SwiGLU gate.
They round to the model dtype wherever the torch path (the CPU path and the reference: norm.py,
rotary.py, activation.py) rounds, since that is where Hugging Face's model rounds too; the only
remaining difference is fp32 ulps, e.g. of a sum of squares taken in another order. For that they
are compiled without FMA contraction (`_EXACT_ROUNDING`): with it, the compiler may fuse a product
into the add that follows it and skip the product's rounding.

The launchers read only shapes, strides and Python numbers, never tensor values, so a decode step
stays capturable in a CUDA graph. This module imports triton: import it only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_svc.attention.triton_kernels import narrow, norm_rope, round_to

# Launch option of every kernel here: no contraction of a multiply and a dependent add into an FMA,
# neither by LLVM nor by ptxas (--fmad=false). Triton contracts by default, and it broke RoPE's
# `round(y1 * cos) - round(y2 * sin)`: LLVM narrows each round-trip through the model dtype to a
# 16-bit op (value-preserving: fp32 has over 2p + 2 bits), then fuses one product into the
# subtraction as fma.rn.bf16 / fma.rn.f16, which rounds once where the torch path rounds twice.
# On an H100 that put ~20% of q/k elements an ulp away from the torch path. Without it, the PTX
# has mul.rn / add.rn / sub.rn, each rounded like a torch op (tests/test_fused_kernels.py checks).
_EXACT_ROUNDING = {"enable_fp_fusion": False}


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    eps,
    SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # One program per token row; a row (hidden size) fits one block, so the sum of squares is one tl.sum.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < SIZE
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + t * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, dtype)  # the residual stream is kept in the model dtype
        tl.store(residual_out_ptr + t * stride_residual_out + cols, x.to(dtype), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / SIZE + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, (w * round_to(x * rstd, dtype)).to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_cache_slot,
    stride_cache_head,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_QK_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_POW2: tl.constexpr,
    STORE_KV: tl.constexpr,
    SATURATE: tl.constexpr,
):
    # One program per token holds all its query and key heads as two [heads, head_dim/2] tiles: the
    # halves that neox RoPE pairs. Keys follow queries in a qkv row, so head h of either starts at
    # h * head_dim, and one tile covers both kinds; values (after the keys) are not touched.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_POW2)[:, None]
    d = tl.arange(0, HALF_POW2)[None, :]
    d_ok = d < HALF
    mask = (h < NUM_QK_HEADS) & d_ok
    dtype = qkv_ptr.dtype.element_ty
    lo = qkv_ptr + t * stride_qkv + h * (2 * HALF) + d
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    is_q = h < NUM_Q_HEADS
    w1 = tl.where(is_q, tl.load(q_weight_ptr + d, mask=d_ok), tl.load(k_weight_ptr + d, mask=d_ok))
    w2 = tl.where(is_q, tl.load(q_weight_ptr + HALF + d, mask=d_ok), tl.load(k_weight_ptr + HALF + d, mask=d_ok))
    # The tables are fp32; the torch path casts the looked-up cos/sin to the model dtype first.
    pos = tl.load(positions_ptr + t)
    cos = round_to(tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok), dtype)
    sin = round_to(tl.load(sin_ptr + pos * stride_sin + d, mask=d_ok), dtype)
    out1, out2 = norm_rope(x1, x2, w1, w2, cos, sin, eps, 2 * HALF, dtype)
    # Written back in place even when the cache gets them too: attention over this step's tokens
    # alone (a prefill from scratch) reads q, k and v from the qkv buffer.
    tl.store(lo, out1, mask=mask)
    tl.store(lo + HALF, out2, mask=mask)
    if STORE_KV:
        # The paged store (what store_kvcache does after this kernel otherwise): kv head j is tile
        # row NUM_Q_HEADS + j, and its value head sits num_kv_heads heads further on in the qkv row.
        # Slot -1 (padding, a CUDA-graph row) stores nothing; the slot is read on the device.
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        kv_mask = mask & (h >= NUM_Q_HEADS) & (slot >= 0)
        cache = slot * stride_cache_slot + (h - NUM_Q_HEADS) * stride_cache_head + d
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + cache, narrow(out1, cache_dtype, SATURATE), mask=kv_mask)
        tl.store(k_cache_ptr + cache + HALF, narrow(out2, cache_dtype, SATURATE), mask=kv_mask)
        v_lo = lo + (NUM_QK_HEADS - NUM_Q_HEADS) * (2 * HALF)
        v1 = tl.load(v_lo, mask=kv_mask)
        v2 = tl.load(v_lo + HALF, mask=kv_mask)
        tl.store(v_cache_ptr + cache, narrow(v1, cache_dtype, SATURATE), mask=kv_mask)
        tl.store(v_cache_ptr + cache + HALF, narrow(v2, cache_dtype, SATURATE), mask=kv_mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (tokens, column blocks); gate is the first SIZE columns of a row, up the next SIZE.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < SIZE
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + SIZE + cols, mask=mask, other=0.0).to(tl.float32)
    act = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + t * stride_out + cols, (act * up).to(dtype), mask=mask)


def _warps(block: int) -> int:
    # ~8 elements a thread: 16-byte accesses in 16-bit dtypes, and a 1024-wide row on 4 warps.
    return min(max(block // 256, 1), 8)


def _rope_warps(half_tile: int) -> int:
    # Two fp32 tiles of `half_tile` live at once: ~32 values a thread keeps them in registers
    # (Qwen3-0.6B: 32 x 64 -> 4 warps; 64 q + 8 kv heads: 128 x 64 -> 16).
    return min(max(half_tile // 512, 1), 16)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) over the last dim; with no residual, (RMSNorm(x) *
    weight, x). New tensors: x and residual are left as they are."""
    size = x.shape[-1]
    rows = x.reshape(-1, size)  # a view for [T, hidden] activations
    assert rows.stride(-1) == 1 and weight.shape == (size,) and weight.dtype == x.dtype
    out = torch.empty_like(rows)
    new_residual = torch.empty_like(rows) if residual is not None else rows
    if rows.shape[0]:
        res = residual.reshape(-1, size) if residual is not None else rows  # unused when there is none
        assert res.shape == rows.shape and res.dtype == rows.dtype and res.stride(-1) == 1
        block = triton.next_power_of_2(size)
        _add_rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, out, new_residual,
            rows.stride(0), res.stride(0), out.stride(0), new_residual.stride(0), eps,
            SIZE=size, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=_warps(block), **_EXACT_ROUNDING,
        )  # fmt: skip
    return out.view(x.shape), new_residual.view(x.shape)


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """In place on qkv [T, (q_heads + 2 * kv_heads) * head_dim]: RMSNorm of every query head (weight
    q_weight) and key head (k_weight), then neox RoPE at `positions` [T] with the angles' cos/sin
    tables [max_positions, head_dim / 2] (fp32). Values are left as they are.

    kv_cache (k_cache, v_cache, slot_mapping): also writes each token's rotated keys and its values
    to slot slot_mapping[t] of the caches [num_blocks, block_size, kv_heads, head_dim], skipping
    slot -1: what the attention backend's separate store would write, from the same kernel."""
    head_dim = q_weight.shape[0]
    num_tokens = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.stride(-1) == 1 and qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim
    assert k_weight.shape == q_weight.shape and head_dim % 2 == 0 and cos.shape[1] * 2 == head_dim
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and positions.shape == (num_tokens,)
    if kv_cache is not None:
        k_cache, v_cache, slot_mapping = kv_cache
        assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
        assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim) and k_cache.stride(-1) == 1
        assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), "slots must be evenly strided"
        assert v_cache.dtype == k_cache.dtype and slot_mapping.shape == (num_tokens,)
        cache_strides = (k_cache.stride(1), k_cache.stride(2))
    else:  # the kernel is specialised without the store: any tensors fill its unused arguments
        k_cache, v_cache, slot_mapping, cache_strides = qkv, qkv, positions, (0, 0)
    if not num_tokens:
        return
    heads, half = num_q_heads + num_kv_heads, head_dim // 2
    heads_pow2, half_pow2 = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    _qk_norm_rope_kernel[(num_tokens,)](
        qkv, q_weight, k_weight, cos, sin, positions, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0), *cache_strides, eps,
        NUM_Q_HEADS=num_q_heads, NUM_QK_HEADS=heads, HEADS_POW2=heads_pow2, HALF=half, HALF_POW2=half_pow2,
        STORE_KV=kv_cache is not None, SATURATE=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=_rope_warps(heads_pow2 * half_pow2), **_EXACT_ROUNDING,
    )  # fmt: skip


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [..., 2 * I] = [gate | up], as a new [..., I] tensor."""
    size = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * size)
    assert rows.stride(-1) == 1 and x.shape[-1] == 2 * size
    out = torch.empty(rows.shape[0], size, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(triton.next_power_of_2(size), 1024)
        grid = (rows.shape[0], triton.cdiv(size, block))
        _silu_and_mul_kernel[grid](
            rows, out, rows.stride(0), out.stride(0), SIZE=size, BLOCK=block, num_warps=_warps(block),
            **_EXACT_ROUNDING,
        )  # fmt: skip
    return out.view(*x.shape[:-1], size)
