"""The few-row matmul kernels (worker_svc/layers/gemv.py) against the torch ops they replace, run by
Triton's CPU interpreter (see tests/triton_interpreter.py), plus an sm_90 build of each variant the
launcher picks, checked for register spills. Without triton everything skips (CI installs it).

References: F.linear of the torch path's input (RMSNorm.add_norm_torch, SiluAndMul.forward_torch).
The prologue rounds where those round, so the new residual must be bit-equal and the product may
differ only by the fp32 summation order (and, in 16-bit dtypes, the final rounding).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import (
    IN_INTERPRETER,
    build_for_h100,
    fix_interpreter,
    require_triton,
    run_under_interpreter,
)
from worker_svc.layers.activation import SiluAndMul
from worker_svc.layers.linear import GEMV_ROWS
from worker_svc.layers.norm import RMSNorm
from worker_svc.models.arch import ModelArch

require_triton()

needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")
EPS = 1e-6

if IN_INTERPRETER:
    from tests import test_fused_kernels  # noqa: F401  (rounds bf16 casts to nearest even, as the GPU)
    from worker_svc.layers import gemv

    fix_interpreter()


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_gemv_under_interpreter() -> None:
    run_under_interpreter(__file__)


def assert_product(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the sum's order: a few fp32 ulps of the row's scale, or one ulp of a 16-bit dtype."""
    scale = ref.float().abs().amax(-1, keepdim=True).clamp_min(1e-30)
    tol = 1e-5 if out.dtype == torch.float32 else 2 * torch.finfo(out.dtype).eps
    err = ((out.float() - ref.float()).abs() / scale).max().item()
    assert err <= tol, f"max error {err:.2e} of the row's scale"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prologue", ["plain", "norm", "add_norm", "silu"])
@pytest.mark.parametrize("rows", [1, 2, 4])  # the one-row kernel, and the few-rows one
def test_gemv(dtype: torch.dtype, prologue: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(len(prologue))
    k, n = 192, 72  # neither a multiple of the tiles below: masks on both edges
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    width = 2 * k if prologue == "silu" else k
    x = (3 * torch.randn(rows, width, generator=gen)).to(dtype)
    residual = (2 * torch.randn(rows, k, generator=gen)).to(dtype) if prologue == "add_norm" else None
    x_before, residual_before = x.clone(), None if residual is None else residual.clone()
    norm = RMSNorm(k, EPS)
    norm.weight.data = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype)
    if prologue == "silu":
        ref_in, ref_res = SiluAndMul().forward_torch(x), None
    elif prologue == "plain":
        ref_in, ref_res = x, None
    else:
        ref_in, ref_res = norm.add_norm_torch(x, residual)
    code = {"plain": gemv.PLAIN, "silu": gemv.SILU}.get(prologue, gemv.NORM)
    # The launcher's pick, and tiles that leave partial chunks and several programs with rows past N.
    for cfg in (None, {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4}):
        out, new_res = gemv.gemv(x, weight, code, residual, norm.weight, EPS, cfg)
        assert_product(out, F.linear(ref_in, weight))
        if prologue in ("norm", "add_norm"):
            assert new_res is not None and torch.equal(new_res, ref_res)
        else:
            assert new_res is None
    # Each of several rows is summed in the one-row kernel's order: the same bits, K in one pass or in steps.
    for cfg in (None, {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4}) if rows > 1 else ():
        out = gemv.gemv(x, weight, code, residual, norm.weight, EPS, cfg)[0]
        for r in range(rows):
            res_r = None if residual is None else residual[r : r + 1]
            assert torch.equal(out[r], gemv.gemv(x[r : r + 1], weight, code, res_r, norm.weight, EPS, cfg)[0][0])
    # Through an identity weight the product is the prologue's output itself, which must round
    # exactly as the torch ops do (in fp32 only ulps of another exp and sum order remain).
    out, _ = gemv.gemv(x, torch.eye(k, dtype=dtype), code, residual, norm.weight, EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_in, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref_in)
    assert torch.equal(x, x_before) and (residual is None or torch.equal(residual, residual_before))


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="needs the compiling (non-interpreted) kernels")
def test_gemv_builds_for_h100_without_spills() -> None:
    """Each projection of Qwen3-0.6B, 8B and 32B (TP=1 and 2), for each row count the layers send,
    with the tiles config() picks and programmatic dependent launch on, as on an H100: no register spills; the
    wait for the kernel before comes after the weight loads where the tile covers K (before them
    otherwise), and the next kernel is released only after it."""
    pytest.importorskip("triton.backends.nvidia")
    from bench.bench_gemv import projections
    from worker_svc.layers import fused, gemv

    builds = {}  # a build depends on the tiles, the prologue and the rows, not on N or K
    for model, tp in itertools.product(("qwen3-0.6b", "qwen3-8b", "qwen3-32b"), (1, 2)):
        for _, n, k, prologue in projections(ModelArch.read(f"bench/{model}"), tp):
            for rows in GEMV_ROWS:
                cfg = gemv.config(n, k, prologue, rows)
                builds[(prologue, cfg["BLOCK_K"] >= k, rows, *cfg.values())] = (n, k, cfg)
    for (prologue, one_pass, rows, *_), (n, k, cfg) in builds.items():
        fn = gemv._gemv_kernel if rows == 1 else gemv._gemv_rows_kernel
        consts = {"PROLOGUE": prologue, "HAS_RESIDUAL": prologue == gemv.NORM, "ONE_PASS": one_pass, "PDL": True}
        consts |= {key: v for key, v in cfg.items() if key.startswith("BLOCK")} | ({"ROWS": rows} if rows > 1 else {})
        sig = {a: "constexpr" if a in consts else ("*bf16" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
        sig["eps"] = "fp32"
        options = {"num_warps": cfg["num_warps"], "num_stages": 1, **fused._EXACT_ROUNDING}
        ptx, log = build_for_h100(fn, sig, consts, options)
        assert " 0 bytes spill stores" in log, f"{prologue} {n}x{k} {rows} rows: {log}"
        load, wait = ptx.find("ld.global"), ptx.find("griddepcontrol.wait")
        assert -1 < wait < ptx.find("griddepcontrol.launch_dependents")
        assert (-1 < load < wait) if one_pass else (-1 < wait < load), f"{prologue} {n}x{k} {rows} rows"
