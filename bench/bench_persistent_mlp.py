"""Is one persistent kernel for a decode step's MLP block faster than the kernel chain it replaces?

    PYTHONPATH=. python3 bench/bench_persistent_mlp.py [--rows 16,64]

The chain (as served): add+RMSNorm, gate_up (cuBLAS), SiLU-mul, down (cuBLAS): four kernels, each
paying its own start-up and drain (docs/benchmarks.md, runs AA and AD; this is run AF). The experiment: one
cooperative Triton launch with a program per SM, in three phases split by grid-wide barriers:
  1. add+RMSNorm of the rows (a row a program), written to a scratch buffer;
  2. gate_up and SiLU-mul: column tiles of gate and up, silu(gate) * up stored;
  3. down: column tiles of the output; with SPLIT3 > 1 each tile's K range is cut in parts, so
     more programs stream, and the parts are summed with fp32 atomics.
Before each barrier a program prefetches the next phase's weight tiles into L2, so the weight
stream need not stop while the grid waits. Timed as bench_blas.py times: CUDA-graph replays over
weight copies that do not fit L2. Checked against the chain's output. Qwen3-0.6B shapes, bf16.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.bench_gemm import SHAPES
from bench.bench_gemv import MIN_BYTES, per_call_us
from bench.timeline import copy_bandwidth
from worker_svc.layers import fused

HIDDEN, INTER = SHAPES["down"]  # down projects the intermediate size back to the hidden size
EPS = 1e-6


@triton.jit
def _grid_sync(counter_ptr, target):
    # Every program arrives (after its own stores), then waits for all: cooperative groups' recipe.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _prefetch(ptrs):
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _mlp_kernel(
    x_ptr, res_ptr, norm_w_ptr, wgu_ptr, wd_ptr, xn_ptr, act_ptr, res_out_ptr, out_ptr, out32_ptr, counter_ptr, M, eps,
    H: tl.constexpr, IM: tl.constexpr, BM: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr,
    PREFETCH: tl.constexpr, SPLIT3: tl.constexpr,
):  # fmt: skip
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    cols_h = tl.arange(0, H)
    # Phase 1: add + RMSNorm, one row a program; meanwhile pull this program's gate/up tiles.
    for t in range(pid, IM // BN1 if PREFETCH else 0, nprog):
        rows_w = t * BN1 + tl.arange(0, BN1)
        _prefetch(wgu_ptr + rows_w[:, None] * H + (tl.arange(0, H // 64) * 64)[None, :])
        _prefetch(wgu_ptr + (IM + rows_w)[:, None] * H + (tl.arange(0, H // 64) * 64)[None, :])
    for r in range(pid, M, nprog):
        h = tl.load(x_ptr + r * H + cols_h).to(tl.float32) + tl.load(res_ptr + r * H + cols_h).to(tl.float32)
        h = h.to(dtype).to(tl.float32)
        tl.store(res_out_ptr + r * H + cols_h, h.to(dtype))
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
        w = tl.load(norm_w_ptr + cols_h).to(tl.float32)
        tl.store(xn_ptr + r * H + cols_h, (w * (h * rstd).to(dtype).to(tl.float32)).to(dtype))
    _grid_sync(counter_ptr, nprog)
    # Phase 2: gate_up with SiLU-mul; then pull this program's down tiles before the barrier.
    rm = tl.arange(0, BM)
    m_ok = rm < M
    for t in range(pid, IM // BN1, nprog):
        rn = t * BN1 + tl.arange(0, BN1)
        acc_g = tl.zeros([BM, BN1], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN1], dtype=tl.float32)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(xn_ptr + rm[:, None] * H + ks[None, :], mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            wg = tl.load(wgu_ptr + rn[None, :] * H + ks[:, None])
            wu = tl.load(wgu_ptr + (IM + rn)[None, :] * H + ks[:, None])
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
        g = acc_g.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * acc_u.to(dtype).to(tl.float32)
        tl.store(act_ptr + rm[:, None] * IM + rn[None, :], act.to(dtype), mask=m_ok[:, None])
    for t in range(pid, H // BN2 if PREFETCH else 0, nprog):
        rows_w = t * BN2 + tl.arange(0, BN2)
        for k0 in range(0, IM, 1024):
            _prefetch(wd_ptr + rows_w[:, None] * IM + k0 + (tl.arange(0, 16) * 64)[None, :])
    _grid_sync(counter_ptr, 2 * nprog)
    # Phase 3: down.
    for t in range(pid, (H // BN2) * SPLIT3, nprog):
        # With SPLIT3 > 1 a tile's K range is cut in parts (more programs streaming), summed with
        # fp32 atomics into a zeroed fp32 output.
        tile, part = t % (H // BN2), t // (H // BN2)
        rn = tile * BN2 + tl.arange(0, BN2)
        acc = tl.zeros([BM, BN2], dtype=tl.float32)
        for k0 in range(part * (IM // SPLIT3), (part + 1) * (IM // SPLIT3), BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(act_ptr + rm[:, None] * IM + ks[None, :], mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            acc = tl.dot(a, tl.load(wd_ptr + rn[None, :] * IM + ks[:, None]), acc)
        if SPLIT3 == 1:
            tl.store(out_ptr + rm[:, None] * H + rn[None, :], acc.to(dtype), mask=m_ok[:, None])
        else:
            tl.atomic_add(out32_ptr + rm[:, None] * H + rn[None, :], acc, mask=m_ok[:, None], sem="relaxed")


def persistent(x, res, norm_w, wgu, wd, bufs, cfg) -> Callable[[], torch.Tensor]:
    xn, act, res_out, out, out32, counter = bufs
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count

    def run() -> torch.Tensor:
        counter.zero_()
        if cfg["SPLIT3"] > 1:
            out32.zero_()
        _mlp_kernel[(sms,)](
            x, res, norm_w, wgu, wd, xn, act, res_out, out, out32, counter, x.shape[0], EPS, H=HIDDEN, IM=INTER,
            BM=max(16, triton.next_power_of_2(x.shape[0])), **cfg, launch_cooperative_grid=True,
        )  # fmt: skip
        return out if cfg["SPLIT3"] == 1 else out32

    return run


def chain(x, res, norm_w, wgu, wd) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(fused.silu_and_mul(F.linear(fused.add_rms_norm(x, res, norm_w, EPS)[0], wgu)), wd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="16,64")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    per_copy = (2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    copies = max(2, -(-MIN_BYTES // per_copy))
    ws = [
        (
            torch.randn(2 * INTER, HIDDEN, dtype=dt, device=dev) / 32,
            torch.randn(HIDDEN, INTER, dtype=dt, device=dev) / 55,
        )
        for _ in range(copies)
    ]
    norm_w = (1 + 0.1 * torch.randn(HIDDEN, device=dev)).to(dt)
    floor_us = per_copy / copy_bandwidth() * 1e6
    print(f"{torch.cuda.get_device_name()}: MLP block, {per_copy / 1e6:.1f} MB of weights")
    print(f"floor {floor_us:.1f} µs at the copy bandwidth")
    configs = [
        {"BN1": bn1, "BN2": bn2, "BK": bk, "num_warps": w, "num_stages": st, "PREFETCH": pf, "SPLIT3": sp}
        for bn1, bn2, bk, w, st, pf, sp in (
            (32, 16, 128, 4, 3, True, 1), (32, 16, 128, 4, 3, False, 1), (32, 16, 128, 4, 4, True, 1),
            (32, 16, 256, 4, 3, True, 1), (32, 16, 128, 4, 4, True, 2), (32, 16, 128, 4, 4, True, 4),
            (32, 16, 256, 4, 3, True, 2),
        )
    ]  # fmt: skip
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN, dtype=dt, device=dev)
        res = torch.randn(rows, HIDDEN, dtype=dt, device=dev)
        base = per_call_us([chain(x, res, norm_w, wgu, wd) for wgu, wd in ws])
        ref = chain(x, res, norm_w, *ws[0])().float()
        line = f"M={rows:<3} chain {base:6.1f} µs (then BN1/BN2/BK/warps/stages/prefetch/down split)"
        for cfg in configs:
            bufs = (torch.empty(rows, HIDDEN, dtype=dt, device=dev), torch.empty(rows, INTER, dtype=dt, device=dev),
                    torch.empty(rows, HIDDEN, dtype=dt, device=dev), torch.empty(rows, HIDDEN, dtype=dt, device=dev),
                    torch.zeros(rows, HIDDEN, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))  # fmt: skip
            try:
                got = persistent(x, res, norm_w, *ws[0], bufs, cfg)().float()
                err = ((got - ref).norm() / ref.norm()).item()
                us = per_call_us([persistent(x, res, norm_w, wgu, wd, bufs, cfg) for wgu, wd in ws])
                name = "/".join(str(int(v)) for v in cfg.values())
                line += f" | {name} {us:6.1f} µs err {err:.0e}"
            except Exception as e:  # out of resources, or a launch the device refuses
                line += f" | {cfg} failed: {type(e).__name__}: {str(e)[:80]}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
