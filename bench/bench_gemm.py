"""Can a Triton tensor-core GEMM beat cuBLAS on the decode-step matmuls of Qwen3-0.6B at M = 16..256 rows?

    PYTHONPATH=. python3 bench/bench_gemm.py [--quick] [--shapes qkv,o] [--rows 16,64]
    PYTHONPATH=. python3 bench/bench_gemm.py --selftest     # CPU only, under the Triton interpreter

y[M, N] = x[M, K] @ W[N, K].T in bf16 with fp32 accumulation. Every figure is µs per call replayed
in a CUDA graph, the calls cycling over enough weight copies (>= 256 MB) that no weight is still in
L2 from its last use, as in a forward pass where each layer has its own weights. For each shape and
M it sweeps tile configurations of `_mm_kernel` (split-K partials plus their reduction timed
together), prints cuBLAS (F.linear) against the best one, checks that one against an fp32
reference, and ends with the per-step total of the four layer projections over 28 layers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import NamedTuple

if "--selftest" in sys.argv:  # the interpreter is chosen when triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.bench_gemv import MIN_BYTES, per_call_us

LAYERS = 28
SHAPES = {
    "qkv": (4096, 1024),
    "o": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
    "lm_head": (151936, 1024),
}
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")


@triton.jit
def _mm_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """One [BLOCK_M, BLOCK_N] tile of x @ W.T over the K slice [pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT).

    Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K); K_SPLIT = K / SPLIT_K, a multiple of BLOCK_K.
    With SPLIT_K == 1 y is the bf16 output; otherwise an fp32 [SPLIT_K, M, N] buffer of partial sums.
    """
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
    # Rows past M or N wrap around so that the loads need no mask; only the store is masked.
    x_ptrs = x_ptr + (rm % M)[:, None] * K + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + (rn % N)[None, :] * K + rk[:, None]  # [BLOCK_K, BLOCK_N]: W.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_SPLIT, BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sum_kernel(p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over the SPLIT_K partials [SPLIT_K, MN] of p, cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


class Cfg(NamedTuple):
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int

    def __str__(self) -> str:
        return f"BM{self.bm} BN{self.bn} BK{self.bk} w{self.warps} s{self.stages} sk{self.split}"


def mm(x: torch.Tensor, w: torch.Tensor, cfg: Cfg, y: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w.T with `cfg`; `part` is the [split, M, N] fp32 buffer when cfg.split > 1."""
    (m, k), n = x.shape, w.shape[0]
    assert k % (cfg.bk * cfg.split) == 0, (k, cfg)
    out = y if part is None else part
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split)
    _mm_kernel[grid](
        x, w, out, m, n, k, k // cfg.split, cfg.bm, cfg.bn, cfg.bk, num_warps=cfg.warps, num_stages=cfg.stages
    )
    if part is not None:
        _sum_kernel[(triton.cdiv(m * n, 1024),)](part, y, m * n, cfg.split, 1024, num_warps=4)
    return y


def buffers(m: int, n: int, cfg: Cfg, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    part = torch.empty(cfg.split, m, n, dtype=torch.float32, device=x.device) if cfg.split > 1 else None
    return torch.empty(m, n, dtype=x.dtype, device=x.device), part


QUICK = [  # BM cap (the BM used is min(cap, next_pow2(M)), at least 16), BN, BK, warps, stages, split-K
    (64, 32, 128, 4, 4, 1), (64, 64, 128, 4, 4, 1), (64, 32, 256, 4, 4, 1), (128, 64, 64, 4, 5, 1),
    (128, 64, 128, 8, 4, 1), (128, 128, 64, 8, 5, 1), (128, 128, 128, 8, 3, 1), (128, 256, 64, 8, 3, 1),
    (64, 32, 128, 4, 4, 4), (64, 64, 128, 4, 4, 4), (64, 32, 64, 4, 5, 4), (16, 64, 256, 4, 3, 4),
]  # fmt: skip


def configs(m: int, n: int, k: int, quick: bool, name: str) -> list[Cfg]:
    """Tile configurations for an [m, k] x [n, k].T product, pruned to keep the sweep short."""
    top = min(128, max(16, 1 << (m - 1).bit_length()))
    if quick or name == "lm_head":
        raw = [Cfg(min(cap, top), *rest) for cap, *rest in QUICK]
    else:
        raw = [
            Cfg(*c)
            for c in itertools.product(
                (16, 32, 64, 128), (32, 64, 128, 256), (64, 128, 256), (4, 8), (3, 4, 5), (1, 2, 4, 8)
            )
        ]
        raw = [
            c for c in raw
            if max(16, top // 2) <= c.bm <= top  # the two largest row tiles: smaller ones re-read the weight
            and c.stages * (c.bm + c.bn) * c.bk * 2 <= 200 << 10  # shared memory
            and not (c.bn == 256 and c.bk == 256)
            and (c.warps == 8) in (c.bm * c.bn >= 8192, c.bm * c.bn > 8192)  # warps by tile size
            and (c.stages < 5 or c.bk == 64)  # a deep pipeline only for thin K tiles
        ]  # fmt: skip
    ok = [c for c in raw if k % (c.bk * c.split) == 0 and (c.split == 1 or (n < 4096 and name != "lm_head"))]
    return list(dict.fromkeys(ok))


def time_cfg(x: torch.Tensor, weights: list[torch.Tensor], cfg: Cfg, ms: float) -> float:
    y, part = buffers(x.shape[0], weights[0].shape[0], cfg, x)
    try:
        return per_call_us([lambda w=w: mm(x, w, cfg, y, part) for w in weights], ms)
    except Exception as e:  # OutOfResources, compile errors: skip the configuration
        print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr, flush=True)
        return float("inf")


def max_rel_err(x: torch.Tensor, w: torch.Tensor, cfg: Cfg) -> float:
    """max |y - ref| / max |ref| against the fp32 product."""
    ref = x.float() @ w.float().T
    y = mm(x, w, cfg, *buffers(x.shape[0], w.shape[0], cfg, x))
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def bench_row(name: str, m: int, weights: list[torch.Tensor], quick: bool) -> tuple[float, float]:
    (n, k), dev = weights[0].shape, weights[0].device
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    cands = configs(m, n, k, quick, name)
    t0 = time.perf_counter()
    print(f"[{name} M={m}] {len(cands)} configs", file=sys.stderr, flush=True)
    cublas = per_call_us([lambda w=w: F.linear(x, w) for w in weights])
    swept = sorted((time_cfg(x, weights, c, 3.0), c) for c in cands)  # short runs rank; the top 3 are re-timed
    best, cfg = min((time_cfg(x, weights, c, 20.0), c) for _, c in swept[:3])
    err = max_rel_err(x, weights[0], cfg)
    flag = "" if err < 1e-2 else "  FAIL"
    gbs, tflops = n * k * 2 / best / 1e3, 2 * m * n * k / best / 1e6
    print(
        f"{name:8} M={m:<4} cuBLAS {cublas:8.1f}  triton {best:8.1f}  x{cublas / best:4.2f}  {gbs:5.0f} GB/s"
        f"  {tflops:6.1f} TF/s  {cfg}  err {err:.1e}{flag}  ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return cublas, best


def selftest() -> None:
    """Correctness of both kernels on CPU under the Triton interpreter."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is not None:  # triton <= 3.6 takes int() of a 1-element array, which numpy >= 2.4 refuses (triton#9171)

        def fixed(tensor: type, scope: object) -> None:
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = fixed
    torch.manual_seed(0)
    n, k = 96, 128  # N is not a multiple of BLOCK_N = 64: its last tile is partly masked
    for m, bn, bk, split in itertools.product((5, 20), (32, 64), (16, 32, 64), (1, 2)):
        # float32: the interpreter's tl.dot multiplies bf16 as raw bit patterns
        x, w = torch.randn(m, k), torch.randn(n, k)
        cfg = Cfg(16, bn, bk, 4, 3, split)
        err = max_rel_err(x, w, cfg)
        print(f"M={m} N={n} K={k} {cfg}: max rel err {err:.1e} {'ok' if err < 1e-5 else 'FAIL'}")
        assert err < 1e-5, (m, cfg, err)
    print("selftest passed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only the {len(QUICK)} hand-picked configurations")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    p.add_argument("--rows", default="16,32,64,128,256", help="comma list of M")
    p.add_argument("--selftest", action="store_true", help="check the kernels on CPU (Triton interpreter) and exit")
    args = p.parse_args()
    if args.selftest:
        return selftest()
    torch.manual_seed(0)
    names, rows = args.shapes.split(","), [int(r) for r in args.rows.split(",")]
    print(f"{torch.cuda.get_device_name()}; µs per call in a CUDA graph, weights cycled past L2", flush=True)
    t0, results = time.perf_counter(), dict[tuple[str, int], tuple[float, float]]()
    for name in names:
        n, k = SHAPES[name]
        copies = max(2, -(-MIN_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
        for m in rows:
            results[name, m] = bench_row(name, m, weights, args.quick)
        del weights
    print(f"\nper step, the four layer projections x {LAYERS} layers (cuBLAS µs per layer = sum of its four)")
    for m in rows:
        if all((s, m) in results for s in LAYER_SHAPES):
            cub, tri = (sum(results[s, m][i] for s in LAYER_SHAPES) for i in (0, 1))
            print(f"M={m:<4} per layer cuBLAS {cub:7.1f} µs  triton {tri:7.1f} µs   per step cuBLAS "
                  f"{cub * LAYERS / 1e3:6.3f} ms  triton {tri * LAYERS / 1e3:6.3f} ms  x{cub / tri:4.2f}")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
