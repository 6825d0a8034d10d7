"""The matmuls of a one- or two-row step (the decode of one or two sequences) as one Triton kernel
each, with the op before them fused in.

y = x @ W.T for one row x reads all of W and does two flops a weight: its cost is bandwidth and a
launch. In a CUDA graph cuBLAS took 5.3-7.0 µs for Qwen3-0.6B's layer projections (0.7-1.8 TB/s,
bench/bench_gemv.py), plus 1.1-1.6 µs for the separate norm or SiLU kernel before each. Here the
programs split W's rows finely (one to eight rows each), so all SMs stream it, and the kernel also
computes its own input:
  - NORM: RMSNorm of x (times the norm weight), after adding the residual if one is given; the
    first program also writes the new residual stream (x + residual);
  - SILU: x is [gate | up] and the input is silu(gate) * up (the MLP's down projection).
The prologue rounds to the model dtype where layers/fused.py's kernels (and the torch paths, and
Hugging Face's model) round, so the product sees the input the unfused ops would give it.

On sm_90 and later the kernel is launched with programmatic dependent launch (layers/pdl.py): a
program requests its tile of W, which no earlier kernel writes, while the kernel before it is still
running, and only then waits for it. A chain of one-row matmuls then pays the latency of those
loads under the previous kernel's tail instead of after it.

Two rows go through a kernel of their own that reads each tile of W once for both rows; from four
rows on, cuBLAS's small-M kernels were faster (layers/linear.py's GEMV_ROWS). The launcher reads
shapes and Python numbers only: CUDA-graph capturable. This module imports triton: import it only
for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_svc.attention.triton_kernels import round_to
from worker_svc.layers.fused import _EXACT_ROUNDING
from worker_svc.layers.pdl import enter, launch_options

PLAIN, NORM, SILU = 0, 1, 2
# A grid of many waves streams at full bandwidth anyway: the LM head on one-row programs (151,936 of
# them) took 185 µs with PDL against 100 without (run AL), so such grids launch without.
MAX_PDL_GRID = 8192


@triton.jit
def _input(x_ptr, res_ptr, norm_w_ptr, ks, k_ok, rstd, K, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # The input's elements ks as the unfused op would have written them (model dtype, as fp32).
    dtype = x_ptr.dtype.element_ty
    if PROLOGUE == 2:  # SILU: gate in [0, K), up in [K, 2K)
        gate = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0).to(tl.float32)
        return round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up, dtype)
    x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:  # NORM
        if HAS_RESIDUAL:
            x = round_to(x + tl.load(res_ptr + ks, mask=k_ok, other=0.0).to(tl.float32), dtype)
        w = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        x = round_to(w * round_to(x * rstd, dtype), dtype)
    return x


@triton.jit
def _rstd(
    x_ptr, res_ptr, res_out_ptr, pid, K, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # NORM's first pass over the (small, cached) input row for its RMS; program 0 also stores the
    # new residual stream. The other prologues take no RMS (0.0, unused).
    rstd = 0.0
    if PROLOGUE == 1:
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x = round_to(x + tl.load(res_ptr + ks, mask=k_ok, other=0.0).to(tl.float32), x_ptr.dtype.element_ty)
                if pid == 0:
                    tl.store(res_out_ptr + ks, x.to(x_ptr.dtype.element_ty), mask=k_ok)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
    return rstd


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, res_out_ptr, w_ptr, out_ptr, N, K, stride_w, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if ONE_PASS:
        # BLOCK_K covers K: the program's whole tile of W is requested first, so its HBM latency
        # runs under the kernel before (with PDL) and the prologue's norm pass instead of after them.
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        enter(PDL)
        rstd = _rstd(x_ptr, res_ptr, res_out_ptr, pid, K, eps, PROLOGUE, HAS_RESIDUAL, BLOCK_K)
        a = _input(x_ptr, res_ptr, norm_w_ptr, ks, k_ok, rstd, K, PROLOGUE, HAS_RESIDUAL)
        acc = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    else:
        enter(PDL)
        rstd = _rstd(x_ptr, res_ptr, res_out_ptr, pid, K, eps, PROLOGUE, HAS_RESIDUAL, BLOCK_K)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = _input(x_ptr, res_ptr, norm_w_ptr, ks, k_ok, rstd, K, PROLOGUE, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_rows_kernel(
    x_ptr, res_ptr, norm_w_ptr, res_out_ptr, w_ptr, out_ptr, N, K, stride_w, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # ROWS contiguous rows of x (and of the residual and the output) against one tile of W: the
    # tile is read from HBM once and used for every row, where cuBLAS's small-M kernels pay about
    # what they pay for 64 rows. Each row's sum runs in the one-row kernel's order.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, ROWS)
    x_stride = 2 * K if PROLOGUE == 2 else K
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if ONE_PASS:
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        enter(PDL)
        for m in tl.static_range(ROWS):
            x_m, res_m, res_out_m = x_ptr + m * x_stride, res_ptr + m * K, res_out_ptr + m * K
            rstd = _rstd(x_m, res_m, res_out_m, pid, K, eps, PROLOGUE, HAS_RESIDUAL, BLOCK_K)
            a = _input(x_m, res_m, norm_w_ptr, ks, k_ok, rstd, K, PROLOGUE, HAS_RESIDUAL)
            acc = tl.where(rows[:, None] == m, tl.sum(w.to(tl.float32) * a[None, :], axis=1)[None, :], acc)
    else:
        enter(PDL)
        rstds = tl.zeros([ROWS], dtype=tl.float32)
        for m in tl.static_range(ROWS):
            r = _rstd(x_ptr + m * x_stride, res_ptr + m * K, res_out_ptr + m * K, pid, K, eps,
                      PROLOGUE, HAS_RESIDUAL, BLOCK_K)  # fmt: skip
            rstds = tl.where(rows == m, r, rstds)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            for m in tl.static_range(ROWS):
                rstd = tl.sum(tl.where(rows == m, rstds, 0.0), axis=0)
                a = _input(x_ptr + m * x_stride, res_ptr + m * K, norm_w_ptr, ks, k_ok, rstd, K, PROLOGUE, HAS_RESIDUAL)
                acc = tl.where(rows[:, None] == m, acc + tl.sum(w.to(tl.float32) * a[None, :], axis=1)[None, :], acc)
    out = out_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


def config(n: int, k: int, prologue: int, rows: int = 1) -> dict[str, int]:
    """Rows of W a program, K chunk and warps, from bench/bench_gemv.py's sweeps on an H100 with PDL at
    the projections of Qwen3-0.6B, 8B and 32B (TP 1 and 2; docs/lab-notes.md, run AR).

    Under PDL a program's whole tile is requested before it waits for the kernel before, so the
    fastest tiles cover K in one pass and are large: about 8,192 weights (16 KB) a program, which
    is more in flight per SM than the one-warp tiles that were best without PDL. Several rows hold
    an input row each beside the tile: where K is short the tile shrinks by as many rows, which keeps
    them in registers (Qwen3-0.6B's sweep at 2 rows). At one row, the 0.6B o and down projections and
    LM head take larger tiles than the per-kernel sweep picked: timed in the whole step, as a chain, they
    won (run AU)."""
    whole = triton.next_power_of_2(k)
    if prologue == PLAIN and n >= 8 * k:  # the LM head: many short rows
        if rows == 1 and whole <= 1024:  # 32 rows a program: few enough programs to launch with PDL
            return {"BLOCK_N": 32, "BLOCK_K": whole, "num_warps": 8}
        block_k = whole if whole <= 4096 else 2048
        return {"BLOCK_N": 1, "BLOCK_K": block_k, "num_warps": max(1, block_k // 1024)}
    if whole > 4096:  # K in steps: the 8B and 32B down projections, the 32B qkv and gate_up
        return {"BLOCK_N": 4, "BLOCK_K": 2048 if prologue == NORM else 1024, "num_warps": 4}
    if prologue == SILU:  # reads two inputs a weight
        return {"BLOCK_N": 8 if rows == 1 else 4, "BLOCK_K": whole, "num_warps": 8}
    if prologue == PLAIN:  # o: a few programs an SM where N is small (0.6B), one row a program otherwise
        return (
            {"BLOCK_N": 16 if rows == 1 and whole <= 2048 else max(1, 8 // rows), "BLOCK_K": whole, "num_warps": 8}
            if n <= 1024
            else {"BLOCK_N": 1, "BLOCK_K": whole, "num_warps": max(1, whole // 512)}
        )
    weights = 8192 // rows
    return {"BLOCK_N": min(8, max(1, weights // whole)), "BLOCK_K": whole, "num_warps": max(1, whole // 512)}


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    cfg: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prologue(x) @ weight.T, new residual or None) for x [M, K'] and weight [N, K], M a power of two
    (each M is a kernel of its own: callers keep to a few, layers/linear.py's GEMV_ROWS).

    PLAIN: x as it is (K' = K). NORM: RMSNorm(x + residual) * norm_weight (K' = K), returning
    x + residual as the new residual (x itself when residual is None). SILU: silu(gate) * up of
    x = [gate | up] (K' = 2K). New tensors: x and residual are left as they are.
    """
    (m, width), (n, k) = x.shape, weight.shape
    assert m & (m - 1) == 0 and width == (2 * k if prologue == SILU else k) and weight.stride(-1) == 1
    assert x.stride(-1) == 1 and (m == 1 or x.stride(0) == width) and x.dtype == weight.dtype
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = None
    if prologue == NORM:
        assert norm_weight is not None and norm_weight.shape == (k,)
        assert residual is None or (residual.shape == x.shape and residual.stride(-1) == 1)
        assert residual is None or m == 1 or residual.stride(0) == k
        new_residual = torch.empty_like(x) if residual is not None else x
    cfg = cfg or config(n, k, prologue, m)
    grid = triton.cdiv(n, cfg["BLOCK_N"])
    pdl = launch_options(x) if grid <= MAX_PDL_GRID else {"PDL": False}
    kernel, rows = (_gemv_kernel, {}) if m == 1 else (_gemv_rows_kernel, {"ROWS": m})
    kernel[(grid,)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else weight,
        new_residual if new_residual is not None else x, weight, out, n, k, weight.stride(0), eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, ONE_PASS=cfg["BLOCK_K"] >= k, num_stages=1,
        **rows, **pdl, **cfg, **_EXACT_ROUNDING,
    )  # fmt: skip
    return out, new_residual
