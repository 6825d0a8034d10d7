"""A decode step's matmuls and the kernels between them, through each BLAS library torch offers.

    PYTHONPATH=. python3 bench/bench_blas.py [--rows 16,32,64,128,256]

One decoder layer of Qwen3-0.6B as a decode step runs it past attention (add+RMSNorm, qkv, o,
add+RMSNorm, gate_up, SiLU-mul, down), replayed in a CUDA graph over enough weight copies (>= 256
MB) that no weight is still in L2, with torch.backends.cuda.preferred_blas_library set to cuBLAS
and then to cuBLASLt; then "hot": cuBLAS with one weight copy, every weight already in L2, the
most that any way of prefetching weights could give. Prints µs per layer and ms per step (28
layers), the floor (the layer's 31.5 MB of weights at the measured copy bandwidth), and what one
kernel costs in such a chain when it does next to nothing (a tiny in-place add, replayed the same
way), the price of each kernel boundary.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.bench_gemm import LAYER_SHAPES, LAYERS, SHAPES
from bench.bench_gemv import MIN_BYTES, per_call_us
from bench.timeline import copy_bandwidth
from worker_svc.layers import fused

EPS = 1e-6
HIDDEN, Q = SHAPES["o"]  # o projects the attention output (q width) back to the hidden size


def layer(rows: int, w: dict[str, torch.Tensor], norm_w: torch.Tensor) -> Callable[[], torch.Tensor]:
    dev, dt = norm_w.device, norm_w.dtype
    x, residual = torch.randn(rows, HIDDEN, dtype=dt, device=dev), torch.randn(rows, HIDDEN, dtype=dt, device=dev)
    attn = torch.randn(rows, Q, dtype=dt, device=dev)  # attention's output (not run here)

    def run() -> torch.Tensor:
        h, res = fused.add_rms_norm(x, residual, norm_w, EPS)
        F.linear(h, w["qkv"])
        h, res = fused.add_rms_norm(F.linear(attn, w["o"]), res, norm_w, EPS)
        return F.linear(fused.silu_and_mul(F.linear(h, w["gate_up"])), w["down"])

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="16,32,64,128,256")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    shapes = {name: SHAPES[name] for name in LAYER_SHAPES}
    per_layer = sum(n * k * 2 for n, k in shapes.values())
    copies = max(2, -(-MIN_BYTES // per_layer))
    weights = [{name: torch.randn(n, k, dtype=dt, device=dev) / k**0.5 for name, (n, k) in shapes.items()}]
    weights += [{name: torch.randn_like(t) for name, t in weights[0].items()} for _ in range(copies - 1)]
    norm_w = torch.ones(HIDDEN, dtype=dt, device=dev)
    floor_us = per_layer / copy_bandwidth() * 1e6
    print(f"{torch.cuda.get_device_name()}: one layer's matmuls and the norm/SiLU kernels between them")
    print(f"weights {per_layer / 1e6:.1f} MB a layer: floor {floor_us:.1f} µs at the copy bandwidth")
    tiny = torch.zeros(1024, dtype=dt, device=dev)
    print(f"a tiny kernel in a chain: {per_call_us([lambda: tiny.add_(1)] * 256):.2f} µs")
    for rows in (int(r) for r in args.rows.split(",")):
        line = f"M={rows:<4}"
        for lib, copies in (("cublas", weights), ("cublaslt", weights), ("hot", weights[:1] * len(weights))):
            torch.backends.cuda.preferred_blas_library("cublaslt" if lib == "cublaslt" else "cublas")
            us = per_call_us([layer(rows, w, norm_w) for w in copies])
            line += f"  {lib} {us:6.1f} µs/layer {us * LAYERS / 1e3:6.3f} ms/step"
        print(line, flush=True)


if __name__ == "__main__":
    main()
