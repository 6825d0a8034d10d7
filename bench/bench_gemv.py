"""The matmuls of a one-row (or --rows M) decode step: cuBLAS (and the separate norm / SiLU kernel before it)
against the fused Triton kernel of worker_svc/layers/gemv.py, over its tile configurations.

    PYTHONPATH=. python3 bench/bench_gemv.py [--model bench/qwen3-8b] [--tp 1] [--rows 1] [--no-sweep]

Every figure is the time per call inside a CUDA graph (as decode runs), with the call cycling over
enough copies of the weight that none is still in L2 from its last use, as in a forward pass where
each layer has its own weights. The calls run back to back, as a step's matmuls do: on sm_90 each
is launched with programmatic dependent launch, so it reads its weights while the one before ends.
For each projection of the model (Qwen3-0.6B's unless --model names another) it prints cuBLAS
alone, cuBLAS plus the kernel it would fuse, the best tile configuration found, its rate, and the
time of the configuration `gemv.config` picks. --rows M times M rows a call (the decode step of M
sequences; layers/linear.py sends 1 and 2 rows to the kernels).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from bench.timing import graph_us
from worker_svc.layers import fused, gemv
from worker_svc.models.arch import ModelArch

MIN_BYTES = 256 << 20  # weight copies cycled through: several times the 50 MB L2


def candidates() -> list[dict[str, int]]:
    return [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
        for bn, bk, warps in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (1, 2, 4, 8))
        if bn * bk <= 16384 and bn * bk >= 32 * warps
    ]


def projections(arch: ModelArch, tp: int) -> list[tuple[str, int, int, int]]:
    """(name, N, K, prologue) of each one-row matmul of a decode step, as one of tp ranks runs it."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return [
        ("qkv", (q + 2 * kv) // tp, hidden, gemv.NORM),
        ("o", hidden, q // tp, gemv.PLAIN),
        ("gate_up", 2 * inter // tp, hidden, gemv.NORM),
        ("down", hidden, inter // tp, gemv.SILU),
        ("lm_head", arch.vocab_size // tp, hidden, gemv.PLAIN),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b", help="a model folder: the shapes of its config.json")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="rows of x a call (a power of two)")
    p.add_argument("--no-sweep", action="store_true", help="time only the configuration gemv.config picks")
    args = p.parse_args()
    torch.manual_seed(0)
    dt, dev, tp = torch.bfloat16, torch.device("cuda"), args.tp
    arch = ModelArch.read(args.model)
    norm_w = torch.ones(arch.hidden_size, dtype=dt, device=dev)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, {args.model}, tp={tp}, {args.rows} rows; µs per call in a CUDA graph, weights past L2")
    print("shape    cuBLAS  +unfused  fused(best)  GB/s   best BLOCK_N BLOCK_K warps  fused(picked)")
    for name, n, k, prologue in projections(arch, tp):
        copies = max(2, -(-MIN_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=dt, device=dev) / k**0.5 for _ in range(copies)]
        print(row(name, prologue, weights, norm_w, args.rows, not args.no_sweep))


def row(name: str, prologue: int, weights: list[torch.Tensor], norm_w: torch.Tensor, rows: int, sweep: bool) -> str:
    (n, k), dt, dev = weights[0].shape, weights[0].dtype, weights[0].device
    x = torch.randn(rows, 2 * k if prologue == gemv.SILU else k, dtype=dt, device=dev)
    res = torch.randn(rows, k, dtype=dt, device=dev)
    cublas = graph_us([lambda w=w: F.linear(x[:, :k], w) for w in weights])
    if prologue == gemv.NORM:
        unfused = graph_us([lambda w=w: F.linear(fused.add_rms_norm(x, res, norm_w, 1e-6)[0], w) for w in weights])
    elif prologue == gemv.SILU:
        unfused = graph_us([lambda w=w: F.linear(fused.silu_and_mul(x), w) for w in weights])
    else:
        unfused = cublas
    r = res if prologue == gemv.NORM else None

    def timed(cfg: dict[str, int] | None, first: int) -> float:
        xs = x if first == prologue else x[:, :k]
        try:
            return graph_us([lambda w=w: gemv.gemv(xs, w, first, r, norm_w, 1e-6, cfg) for w in weights])
        except OutOfResources:  # tiles too large for shared memory
            return float("inf")

    picked = timed(None, prologue)
    if not sweep:
        return f"{name:8} {cublas:6.1f}  {unfused:8.1f}  {'':>11}  {'':>5}   {'':26} {picked:6.1f}"
    # Each shape is swept with its own prologue: the best tiles for the fused kernel are not those of
    # the plain product (the SiLU prologue reads twice the input).
    times = sorted((timed(cfg, prologue), i, cfg) for i, cfg in enumerate(candidates()))
    best, _, best_cfg = times[0]
    print(name, "top:", [(round(t, 2), tuple(c.values())) for t, _, c in times[:4]])
    cfg_s = " ".join(f"{v:7}" for v in best_cfg.values())
    gbs = n * k * 2 / best / 1e3
    return f"{name:8} {cublas:6.1f}  {unfused:8.1f}  {best:11.1f}  {gbs:5.0f}   {cfg_s:26} {picked:6.1f}"


if __name__ == "__main__":
    main()
