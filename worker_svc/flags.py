"""The worker's command-line flags, in a module light enough for `nanovllm health` to start fast."""

from __future__ import annotations

import argparse

from worker_svc.config import KV_CACHE_DTYPES


def add_args(p: argparse.ArgumentParser) -> None:
    """Worker flags; `nanovllm serve` shares them."""
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--kvcache-block-size", type=int, default=16)
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="fp8: e4m3, half the bytes (auto: --dtype)"
    )
    p.add_argument("--num-kvcache-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache budget on cpu")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layers, not our fused kernels")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton", "flash-attn"))
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
