"""The fused Triton kernels (worker_svc/layers/fused.py) vs the torch paths they replace, run by
Triton's CPU interpreter.

As in test_triton_interpret.py: TRITON_INTERPRET must be set before triton is imported, and
conftest already imports triton via transformers, so under a plain `pytest` run one test re-runs
this file in a subprocess with TRITON_INTERPRET=1, where the kernel tests actually execute. CI
installs triton for them (.ci/run); without triton everything skips.

The references are the torch paths in the same dtype. In bf16/fp16 the kernels round where those
round, so nearly all elements must agree exactly (assert_matches says what the rest may be off by);
fp32 must be allclose. qk_norm_rope's store into the paged KV cache must write exactly what the
attention backend's separate store writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import IN_INTERPRETER, build_for_h100, require_triton, run_under_interpreter
from worker_svc.attention.backend import AttentionBackend
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.attention.torch_backend import TorchBackend
from worker_svc.kv_cache import allocate
from worker_svc.layers.activation import SiluAndMul
from worker_svc.layers.norm import RMSNorm
from worker_svc.layers.rotary import RotaryEmbedding, apply_rotary
from worker_svc.models.arch import ModelArch
from worker_svc.models.qwen3 import Qwen3Model

require_triton()

needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 17]
HEADS, HEAD_DIM, HIDDEN, EPS = (4, 2), 128, 256, 1e-6

if IN_INTERPRETER:
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    from tests.triton_interpreter import fix_interpreter
    from worker_svc.attention.triton_backend import TritonBackend, store_kvcache
    from worker_svc.layers import fused

    qk_norm_rope = fused.qk_norm_rope
    fix_interpreter()  # the decode kernel loops over loaded bounds

    def _round_bf16_to_nearest_even() -> None:
        """triton 3.6's interpreter casts fp32 to bf16 by truncating the mantissa; the GPU (cvt.rn)
        and torch round to nearest even. Left as is, every bf16 rounding the kernels copy from the
        torch path would be off by up to an ulp, and RoPE's differences would magnify that."""
        original = _interp.InterpreterBuilder.cast_impl

        def cast_impl(self: _interp.InterpreterBuilder, src: _interp.TensorHandle, dst_type: tl.dtype) -> object:
            if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
                return original(self, src, dst_type)
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            half_ulp_even = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return _interp.TensorHandle(((bits + half_ulp_even) >> np.uint32(16)).astype(np.uint16), dst_type.scalar)

        _interp.InterpreterBuilder.cast_impl = cast_impl

    _round_bf16_to_nearest_even()


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_fused_kernels_under_interpreter() -> None:
    run_under_interpreter(__file__)


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="needs the compiling (non-interpreted) kernels")
def test_kernels_compile_for_h100_without_spills_or_fma() -> None:
    """The interpreter never lowers to PTX; this builds each kernel for sm_90 as the runtime would
    at Qwen3-0.6B's shapes (hidden 1024, 16 q / 8 kv heads of 128, MLP 3072), and at Qwen3-32B's
    widest ones (hidden 5120, 64 q + 8 kv heads), in bf16 and fp16, with the launchers' compile
    options. No register spills; and no contracted arithmetic: every float mul/add/sub in the PTX
    rounds on its own (.rn) and there is no fma, which would skip a rounding the torch path makes
    (with contraction on, RoPE's differences of products became fma.rn.bf16 and were an ulp off
    on ~20% of elements on an H100)."""
    pytest.importorskip("triton.backends.nvidia")
    import re

    from worker_svc.layers import fused

    rope = {"NUM_Q_HEADS": 16, "NUM_QK_HEADS": 24, "HEADS_POW2": 32, "HALF": 64, "HALF_POW2": 64, "STORE_KV": False}
    big_rope = {**rope, "NUM_Q_HEADS": 64, "NUM_QK_HEADS": 72, "HEADS_POW2": 128}  # Qwen3-32B's heads
    fp8_cache = {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}
    builds = [
        (fused._add_rms_norm_kernel, {"SIZE": 1024, "BLOCK": 1024, "HAS_RESIDUAL": True}, 4),
        (fused._add_rms_norm_kernel, {"SIZE": 1024, "BLOCK": 1024, "HAS_RESIDUAL": False}, 4),
        (fused._add_rms_norm_kernel, {"SIZE": 5120, "BLOCK": 8192, "HAS_RESIDUAL": True}, 8),
        (fused._qk_norm_rope_kernel, rope, fused._rope_warps(32 * 64)),
        (fused._qk_norm_rope_kernel, {**rope, "STORE_KV": True}, fused._rope_warps(32 * 64)),
        (fused._qk_norm_rope_kernel, {**big_rope, "STORE_KV": True}, fused._rope_warps(128 * 64)),
        (fused._qk_norm_rope_kernel, {**rope, "STORE_KV": True}, fused._rope_warps(32 * 64), fp8_cache),
        (fused._silu_and_mul_kernel, {"SIZE": 3072, "BLOCK": 1024}, 4),
    ]
    special = {"positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    special["eps"] = "fp32"
    float_op = re.compile(r"^\s*((?:fma|mul|add|sub)(?:\.\w+)*\.(?:f32|f16|bf16)(?:x2)?)\s", re.MULTILINE)
    for dtype in ("bf16", "fp16"):
        for fn, consts, warps, *types in builds:
            names = fn.arg_names
            default = {n: f"*{dtype}" if n.endswith("_ptr") else "i32" for n in names}
            given = {**special, **(types[0] if types else {})}
            sig = {n: "constexpr" if n in consts else given.get(n, default[n]) for n in names}
            options = {"num_warps": warps, **fused._EXACT_ROUNDING}
            ptx, log = build_for_h100(fn, sig, consts, options)
            what = f"{fn.__name__} {dtype} {consts} {types}"
            ops = set(float_op.findall(ptx))
            assert ops, f"{what}: the float-op pattern matched nothing; has the PTX syntax changed?"
            contracted = sorted(op for op in ops if ".rn" not in op or op.startswith("fma"))
            assert not contracted, f"{what}: contractible or fused float ops {contracted}"
            assert " 0 bytes spill stores" in log, f"{what}: {log}"


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: allclose. 16-bit: nearly every element bit-equal, and the rest off by at most 2 ulps at
    the scale of their row (last dim): the kernels round where the torch path rounds, so only an fp32
    ulp of their own (a sum of squares in another order, another exp) may flip a rounding, which the
    next product can double and RoPE's differences of products can leave large next to a small
    result."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return
    # A misplaced rounding also stays within an ulp or two, but on many elements, not a handful.
    assert (out == ref).float().mean().item() >= 0.99
    scale = ref.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(ref.dtype).tiny)
    ulp = torch.finfo(ref.dtype).eps * torch.exp2(torch.floor(torch.log2(scale)))
    err = (out.float() - ref.float()).abs()
    assert (err <= 2 * ulp).all(), f"{(err / ulp).max().item():.1f} ulps of the row's scale apart"


def random_weight(size: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1.0 + 0.3 * torch.randn(size, generator=gen)).to(dtype)


def norm_module(size: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(size, EPS)
    norm.weight.data = random_weight(size, dtype, gen)
    return norm


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype: torch.dtype, rows: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    norm = norm_module(HIDDEN, dtype, gen)
    # x as a strided view (rows wider than the hidden size): the launcher must honour row strides.
    x = (3 * torch.randn(rows, HIDDEN + 64, generator=gen)).to(dtype)[:, :HIDDEN]
    residual = (5 * torch.randn(rows, HIDDEN, generator=gen)).to(dtype) if with_residual else None
    x_before, residual_before = x.clone(), None if residual is None else residual.clone()
    out, new_residual = fused.add_rms_norm(x, residual, norm.weight, EPS)
    ref, ref_residual = norm.add_norm_torch(x, residual)
    assert_matches(out, ref)
    assert torch.equal(new_residual, ref_residual)  # one rounded add: no excuse to differ
    assert torch.equal(x, x_before) and (residual is None or torch.equal(residual, residual_before))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads", [HEADS, (2, 1)])  # (2, 1): a TP=2 rank's share of (4, 2)
def test_qk_norm_rope(dtype: torch.dtype, rows: int, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(100 + rows)
    hq, hkv = heads
    rotary = RotaryEmbedding(HEAD_DIM, 4096, 1e6)
    q_norm, k_norm = norm_module(HEAD_DIM, dtype, gen), norm_module(HEAD_DIM, dtype, gen)
    qkv = (2 * torch.randn(rows, (hq + 2 * hkv) * HEAD_DIM, generator=gen)).to(dtype)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    positions[0] = 4095  # the last table row
    q, k, v = qkv.split([hq * HEAD_DIM, hkv * HEAD_DIM, hkv * HEAD_DIM], dim=-1)
    cos, sin = rotary(positions, dtype)
    ref_q = apply_rotary(q_norm.add_norm_torch(q.reshape(rows, hq, HEAD_DIM), None)[0], cos, sin)
    ref_k = apply_rotary(k_norm.add_norm_torch(k.reshape(rows, hkv, HEAD_DIM), None)[0], cos, sin)
    ref_v = v.clone()
    fused.qk_norm_rope(qkv, positions, rotary.cos, rotary.sin, q_norm.weight, k_norm.weight, hq, hkv, EPS)
    out_q, out_k, out_v = qkv.split([hq * HEAD_DIM, hkv * HEAD_DIM, hkv * HEAD_DIM], dim=-1)
    assert_matches(out_q.reshape(ref_q.shape), ref_q)
    assert_matches(out_k.reshape(ref_k.shape), ref_k)
    assert torch.equal(out_v, ref_v)


def paged_caches(
    num_blocks: int, block_size: int, kv_heads: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random [2, layers, blocks, block_size, kv_heads, D] allocation and its second layer's k and v
    caches, the views the runner binds (kv_cache.allocate); random, so an untouched slot shows."""
    alloc = torch.randn(2, 2, num_blocks, block_size, kv_heads, HEAD_DIM, generator=gen).to(dtype)
    return alloc, alloc[0, 1], alloc[1, 1]


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits, so equality is bit-equality in any dtype (fp8 and NaNs included)."""
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def check_fused_store(dtype: torch.dtype, heads: tuple[int, int], lens: list[int], cache_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(300 + sum(lens))
    hq, hkv = heads
    block_size, width = 4, (hq + 2 * hkv) * HEAD_DIM
    rotary = RotaryEmbedding(HEAD_DIM, 4096, 1e6)
    q_norm, k_norm = norm_module(HEAD_DIM, dtype, gen), norm_module(HEAD_DIM, dtype, gen)
    prefixes = torch.randint(0, 9, (len(lens),), generator=gen).tolist()
    need = [-(-(p + n) // block_size) for p, n in zip(prefixes, lens, strict=True)]
    blocks = torch.randperm(sum(need) + 3, generator=gen).tolist()  # 3 blocks no sequence owns
    slots, positions, used = [], [], 0
    for p, n, nb in zip(prefixes, lens, need, strict=True):
        table, used = blocks[used : used + nb], used + nb
        positions += range(p, p + n)
        slots += [table[i // block_size] * block_size + i % block_size for i in range(p, p + n)]
    slots = [-1 if t % 4 == 3 else s for t, s in enumerate(slots)] + [-1, -1]
    positions += [0, 0]
    rows = len(slots)
    slot_mapping, positions = torch.tensor(slots), torch.tensor(positions)
    # qkv as a row-strided view (a wider buffer): the kernel must honour the row stride for v too.
    qkv = (2 * torch.randn(rows, width + 64, generator=gen)).to(dtype)[:, :width]
    alloc, k_cache, v_cache = paged_caches(sum(need) + 3, block_size, hkv, cache_dtype, gen)
    before = alloc.clone()
    ref_qkv, ref_alloc = qkv.clone(), alloc.clone()
    args = (rotary.cos, rotary.sin, q_norm.weight, k_norm.weight, hq, hkv, EPS)

    fused.qk_norm_rope(qkv, positions, *args, kv_cache=(k_cache, v_cache, slot_mapping))
    fused.qk_norm_rope(ref_qkv, positions, *args)
    _, ref_k, ref_v = ref_qkv.split([hq * HEAD_DIM, hkv * HEAD_DIM, hkv * HEAD_DIM], dim=-1)
    ref_k, ref_v = ref_k.view(rows, hkv, HEAD_DIM), ref_v.view(rows, hkv, HEAD_DIM)
    store_kvcache(ref_k, ref_v, ref_alloc[0, 1], ref_alloc[1, 1], slot_mapping)

    assert torch.equal(bits(qkv), bits(ref_qkv))  # q and k in place as without the store, v as it was
    assert torch.equal(bits(alloc), bits(ref_alloc))
    keep = slot_mapping >= 0
    flat = alloc.view(2, 2, -1, hkv, HEAD_DIM)
    if cache_dtype == dtype:  # (the interpreter's fp8 conversion rounds unlike torch's .to)
        assert torch.equal(bits(flat[0, 1, slot_mapping[keep]]), bits(ref_k[keep]))
        assert torch.equal(bits(flat[1, 1, slot_mapping[keep]]), bits(ref_v[keep]))
    written = torch.zeros(flat.shape[:3], dtype=torch.bool)
    written[:, 1, slot_mapping[keep]] = True
    assert torch.equal(bits(flat[~written]), bits(before.view(flat.shape)[~written]))  # -1 rows landed nowhere


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [HEADS, (2, 1)])
@pytest.mark.parametrize("lens", [[1], [5, 1, 9], [3, 17, 2, 6]])
def test_qk_norm_rope_fused_store(dtype: torch.dtype, heads: tuple[int, int], lens: list[int]) -> None:
    """With the caches, the kernel writes exactly what the backend's separate store (store_kvcache)
    writes after the kernel without them: the whole cache allocation bit-equal, qkv too. Ragged
    sequences, each with a prefix already cached, in shuffled blocks; every fourth token and two
    padding rows (as a CUDA graph pads a batch) at slot -1; the rest of the allocation untouched."""
    check_fused_store(dtype, heads, lens, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_fused_store_into_fp8_cache(dtype: torch.dtype) -> None:
    """A cache in another dtype (float8 e4m3) gets the same conversion as store_kvcache gives it."""
    check_fused_store(dtype, HEADS, [5, 1, 9], torch.float8_e4m3fn)


@needs_interpreter
def test_launchers_compile_without_fp_contraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every launch passes _EXACT_ROUNDING, whose PTX the compile test checks (the interpreter
    ignores the option, so only the launch arguments can be checked here)."""
    seen: dict[str, dict] = {}
    for kernel in (fused._add_rms_norm_kernel, fused._qk_norm_rope_kernel, fused._silu_and_mul_kernel):
        original = kernel.run

        def run(*args: object, _name: str = kernel.__name__, _original=original, **kwargs: object) -> object:
            seen[_name] = kwargs
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    x = torch.randn(2, HIDDEN)
    fused.add_rms_norm(x, x, torch.ones(HIDDEN), EPS)
    rotary = RotaryEmbedding(HEAD_DIM, 16, 1e6)
    qkv, w = torch.randn(2, 8 * HEAD_DIM), torch.ones(HEAD_DIM)
    fused.qk_norm_rope(qkv, torch.zeros(2, dtype=torch.long), rotary.cos, rotary.sin, w, w, 4, 2, EPS)
    fused.silu_and_mul(x)
    assert len(seen) == 3
    for name, kwargs in seen.items():
        assert kwargs.get("enable_fp_fusion") is False, name


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("size", [96, 1536])  # one masked block; two blocks of 1024, the second partial
def test_silu_and_mul(dtype: torch.dtype, rows: int, size: int) -> None:
    gen = torch.Generator().manual_seed(200 + rows)
    x = (3 * torch.randn(rows, 2 * size, generator=gen)).to(dtype)
    assert_matches(fused.silu_and_mul(x), SiluAndMul().forward_torch(x))


def tiny_model(dtype: torch.dtype, backend: AttentionBackend | None = None) -> Qwen3Model:
    arch = ModelArch(
        model_type="qwen3", vocab_size=64, hidden_size=HIDDEN, intermediate_size=384, num_layers=2,
        num_heads=HEADS[0], num_kv_heads=HEADS[1], head_dim=HEAD_DIM, max_position_embeddings=4096,
        rms_norm_eps=EPS, rope_theta=1e6, tie_word_embeddings=True, attention_bias=False, torch_dtype=None,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the runner builds it: parameters in dtype, RoPE tables fp32
    try:
        model = Qwen3Model(arch, backend or TorchBackend(), max_positions=4096)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        scale = 0.3 if "norm" in name else 0.05
        param.data = (("norm" in name) + scale * torch.randn(param.shape, generator=gen)).to(dtype)
    return model


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_forward_with_fused_kernels(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole Qwen3 forward, fused path against torch path: the residual stream through the
    fused adds, q/k normed and rotated in place in the qkv buffer, and the final norm's add. Every
    tensor claims to be on CUDA for the fused run, so the modules pick their kernels while the
    tensors (and the interpreter) stay on the CPU."""
    model = tiny_model(dtype)
    lens, starts = [9, 8], [1000, 3000]  # two prompts; positions far into the tables
    ids = torch.randint(0, 64, (sum(lens),), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)])
    loc = [0, lens[0], sum(lens)]
    meta = AttnMetadata(
        slot_mapping=torch.full((sum(lens),), -1), query_start_loc=torch.tensor(loc, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=torch.zeros(2, 1, dtype=torch.int32),
        max_query_len=max(lens), max_seq_len=max(lens), query_start_loc_host=loc, seq_lens_host=lens,
        is_decode=False, has_prefix=False,
    )  # fmt: skip
    with torch.inference_mode():
        ref = model(ids, positions, meta)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            out = model(ids, positions, meta)
    # The kernels' own exactness is checked above; here a miswired call (tables, weights, heads, the
    # residual stream) would be far off, while a stray 1-ulp flip spreads through the matmuls.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


class FusedStoreBackend(TorchBackend):
    """The torch reference, but claiming the plain scatter store, so the model's q/k kernel stores
    K/V for it; its own store must then never run."""

    def fuses_store(self, k_cache: torch.Tensor) -> bool:
        return True

    def store(self, *args: object) -> None:
        raise AssertionError("the q/k kernel should have stored K/V; PagedAttention stored them again")


def step_meta(slots: list[int], lens: list[int], seq_lens: list[int], tables: list[list[int]]) -> AttnMetadata:
    loc = [0, *torch.tensor(lens).cumsum(0).tolist()]
    return AttnMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(lens), max_seq_len=max(seq_lens), query_start_loc_host=loc, seq_lens_host=seq_lens,
        is_decode=all(n == 1 for n in lens), has_prefix=any(s > n for s, n in zip(seq_lens, lens, strict=True)),
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize(
    ("dtype", "backend_name"),
    # The interpreter's tl.dot multiplies bf16 as raw bit patterns: the Triton attention runs in fp32.
    [(torch.float32, "fused-store"), (torch.bfloat16, "fused-store"), (torch.float32, "triton")],
)
def test_model_steps_with_fused_store(dtype: torch.dtype, backend_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of the fused store through Qwen3Attention and PagedAttention: a warm-up forward
    before the cache exists (nothing stored), then two prompts' prefill and a decode step that
    reads their K/V back, with the q/k kernel storing; against the torch path with its separate
    store. Same caches (unused slots still zero) and outputs, within the whole-model tolerance.
    With the Triton backend the decode step's attention kernel norms, rotates and stores q and k
    itself (attend_rope), so the q/k kernel must not run in that step."""
    block_size, tables = 4, [[5, 2, 7], [1, 6, 3]]
    lens = [9, 8]
    ids = torch.randint(0, 64, (sum(lens) + 2,), generator=torch.Generator().manual_seed(5))

    def slots(seq: int, positions: range) -> list[int]:
        return [tables[seq][p // block_size] * block_size + p % block_size for p in positions]

    prefill = step_meta(slots(0, range(9)) + slots(1, range(8)), lens, lens, tables)
    decode = step_meta(slots(0, range(9, 10)) + slots(1, range(8, 9)), [1, 1], [10, 9], tables)
    steps = [
        (ids[:17], torch.cat([torch.arange(9), torch.arange(8)]), prefill),
        (ids[17:], torch.tensor([9, 8]), decode),
    ]
    backend = FusedStoreBackend() if backend_name == "fused-store" else TritonBackend(num_sms=1)  # 1: split-K
    ref_model, model = tiny_model(dtype), tiny_model(dtype, backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    rope_calls = []
    monkeypatch.setattr(fused, "qk_norm_rope", lambda *a, **kw: rope_calls.append(1) or qk_norm_rope(*a, **kw))
    with torch.inference_mode():
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            model(*steps[0])  # the warm-up: empty caches, so neither store may run
        ref_cache = allocate(ref_model, 8, block_size, dtype, torch.device("cpu"))
        cache = allocate(model, 8, block_size, dtype, torch.device("cpu"))
        for ids_, positions, meta in steps:
            ref = ref_model(ids_, positions, meta)
            rope_calls.clear()
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
                out = model(ids_, positions, meta)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert len(rope_calls) == (0 if backend_name == "triton" else 2)  # the decode step, one call a layer
    torch.testing.assert_close(cache, ref_cache, rtol=tol, atol=tol)
    used = torch.zeros(8 * block_size, dtype=torch.bool)
    used[prefill.slot_mapping] = used[decode.slot_mapping] = True
    flat = cache.view(2, cache.shape[1], -1, *cache.shape[-2:])
    assert flat[:, :, used].abs().amax(-1).gt(0).all() and not flat[:, :, ~used].any()
