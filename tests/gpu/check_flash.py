"""The flash-attn backend on a GPU (flash-attn 2.x, or flash-attn-4 where it alone is installed: what
`get_backend("flash-attn")` builds): its prefill and decode against an fp32 reference and against our
Triton backend, on random data at Qwen3-0.6B's attention shape (16 q heads, 8 KV heads, head_dim
128), then the steps of both backends timed, in one table.

Run on the GPU from the repo root:  PYTHONPATH=. python3 tests/gpu/check_flash.py [--seed N] [--block-sizes 16,128]
Each block size runs on every backend that accepts it (flash-attn 2.x: multiples of 256). The
flash-attn side goes through the backend (store, then attend), as PagedAttention calls it; decode
also as a CUDA-graph replay with a loose length bound, as the worker captures it. Exits 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import sys
import time
from collections.abc import Callable

import torch
import triton.testing

from bench.timing import replay_us
from tests.gpu import check_kernels as ck
from worker_svc.attention import get_backend
from worker_svc.attention import triton_backend as tb
from worker_svc.attention.backend import AttentionBackend

HEADS, HEAD_DIM = ck.QWEN3["heads"], ck.QWEN3["head_dim"]
SCALE = HEAD_DIM**-0.5


def attend(backend: AttentionBackend, c: ck.Case) -> torch.Tensor:
    return backend.attend(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, SCALE)


def guarded(name: str, fn: Callable[[], object]) -> bool:
    """Runs fn; an exception is a failed check, so one unsupported case leaves the others running."""
    try:
        fn()
    except Exception as exc:
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
        ck.FAILURES.append(name)
        return False
    return True


def compare(name: str, flash: AttentionBackend, triton: AttentionBackend, c: ck.Case, dtype: torch.dtype) -> None:
    """Stores the step's K/V through the flash backend, then checks its output against the fp32
    reference and against the Triton backend's output on the same cache."""

    def run() -> None:
        flash.store(c.k, c.v, c.k_cache, c.v_cache, c.meta)
        out = attend(flash, c)
        ck.report(f"{flash.name} {name} vs fp32", out, ck.reference(c, SCALE), dtype)
        ck.report(f"{flash.name} {name} vs triton", out, attend(triton, c).float(), dtype)

    guarded(name, run)


def check(flash: AttentionBackend, triton: AttentionBackend, block_size: int, dtype: torch.dtype) -> None:
    def case(ctx: list[int], q: list[int], bound: int | None = None) -> ck.Case:
        return ck.make_case(ctx, q, dtype, HEADS, HEAD_DIM, block_size, bound)

    tag = f"bs={block_size} {str(dtype).removeprefix('torch.')}"
    fresh = ck.rand_lens(7, 1, 1500, block_size)
    compare(f"fresh prompts b=7 {tag}", flash, triton, case(fresh, fresh), dtype)
    ctx = ck.rand_lens(7, 1, 4096, block_size)
    chunks = [random.randint(1, min(x, 600)) for x in ctx]
    compare(f"cached prefix b=7 ctx<=4096 {tag}", flash, triton, case(ctx, chunks), dtype)
    ctx = ck.rand_lens(64, 1, 4096, block_size)
    mixed = [1 if i % 2 else random.randint(1, min(x, 256)) for i, x in enumerate(ctx)]
    compare(f"mixed decode + chunks b=64 {tag}", flash, triton, case(ctx, mixed), dtype)
    for batch, max_ctx in ((1, 4096), (7, 4096), (64, 4096), (256, 2048)):
        ctx = ck.rand_lens(batch, 2, max_ctx, block_size)
        compare(f"decode b={batch} ctx<={max_ctx} {tag}", flash, triton, case(ctx, [1] * batch, 8192), dtype)
    guarded(f"decode CUDA-graph {tag}", lambda: check_decode_graph(flash, block_size, dtype, tag))


def check_decode_graph(flash: AttentionBackend, block_size: int, dtype: torch.dtype, tag: str) -> None:
    """Capture decode with the bound the worker uses (max_model_len), replay on new lengths and tables."""
    batch = 64
    c = ck.make_case([4096] * batch, [1] * batch, dtype, HEADS, HEAD_DIM, block_size, bound=8192)
    attend(flash, c)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(flash, c)
    for _ in range(2):
        lens = ck.rand_lens(batch, 2, 4096, block_size)
        c.meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        c.meta.seq_lens_host = lens
        c.meta.block_tables.copy_(c.meta.block_tables[torch.randperm(batch, device=ck.DEV)])
        c.q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        ck.report(f"{flash.name} decode CUDA-graph replay b={batch} {tag}", out, ck.reference(c, SCALE), dtype)


def first_call_s(fn: Callable[[], object]) -> float:
    """Seconds of a first call: flash-attn-4 compiles each kernel variant then (its JIT)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def eager_us(fn: Callable[[], object]) -> float:
    """Median µs of eager calls, host work included, L2 flushed: how prefill runs in the worker."""
    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def steps(block_size: int, bound: int) -> dict[str, tuple[ck.Case, str]]:
    """The timed steps, each with how the worker runs it: prefill eager, decode in a CUDA graph."""
    bf16, n = torch.bfloat16, 1024
    out = {
        "prefill 8 x 1024 fresh": (ck.make_case([n] * 8, [n] * 8, bf16, HEADS, HEAD_DIM, block_size), "eager"),
        "prefill 8 x 1024 after 1024 cached": (
            ck.make_case([2 * n] * 8, [n] * 8, bf16, HEADS, HEAD_DIM, block_size),
            "eager",
        ),
    }
    for batch in (1, 64, 256):
        case = ck.make_case([n] * batch, [1] * batch, bf16, HEADS, HEAD_DIM, block_size, bound)
        out[f"decode b={batch} ctx 1024 (bound {bound})"] = (case, "graph")
    return out


def bench(backends: list[AttentionBackend], block_size: int, bound: int) -> list[str]:
    rows = []
    for label, (c, mode) in steps(block_size, bound).items():
        tb.store_kvcache(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)
        cells = []
        for b in backends:
            try:
                first = first_call_s(lambda b=b, c=c: attend(b, c))
                timed = eager_us if mode == "eager" else replay_us
                cells.append(f"{timed(lambda b=b, c=c: attend(b, c)):>9.1f} µs ({first:5.2f} s)")
            except Exception as exc:
                cells.append(f"{'failed: ' + type(exc).__name__:>26}")
                ck.FAILURES.append(f"{b.name} timing {label} bs={block_size}")
        rows.append(f"{label + f' bs={block_size} [{mode}]':<52} " + "  ".join(cells))
    return rows


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--block-sizes", default="16,128", help="KV cache block sizes, comma-separated")
    parser.add_argument("--bound", type=int, default=4096, help="decode graphs' max_seq_len (the max model length)")
    args = parser.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    flash, triton_backend = get_backend("flash-attn", "cuda"), get_backend("triton", "cuda")
    versions = "  ".join(f"{d} {dist_version(d)}" for d in ("flash-attn", "flash-attn-4", "nvidia-cutlass-dsl"))
    print(f"seed {args.seed}  {torch.cuda.get_device_name()}  torch {torch.__version__}  {type(flash).__name__}")
    print(versions, flush=True)
    rows = [f"{'step':<52} {'triton: time (first call)':>26}  {'flash-attn: time (first call)':>26}"]
    for block_size in map(int, args.block_sizes.split(",")):
        try:
            flash.fuses_store(torch.empty(1, block_size, HEADS[1], HEAD_DIM))  # raises where it refuses the size
        except ValueError as exc:
            print(f"skip block size {block_size}: {exc}")
            continue
        # Timings first, so the first-call column holds each kernel's compile time.
        rows += bench([triton_backend, flash], block_size, args.bound)
        t0 = time.time()
        for dtype in (torch.bfloat16, torch.float16):
            check(flash, triton_backend, block_size, dtype)
        print(f"block size {block_size}: checks took {time.time() - t0:.0f} s", flush=True)
    print("\n" + "\n".join(rows))
    if ck.FAILURES:
        print(f"\nFAILED: {ck.FAILURES}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
