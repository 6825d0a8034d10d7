"""Triton attention kernels vs a plain torch reference, run by Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own jit helpers
are decorated at import time), and conftest already imports triton via transformers. So under a
plain `pytest` run one launcher test re-runs this file in a subprocess with TRITON_INTERPRET=1,
where the kernel tests below actually execute. Without triton everything skips.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.triton_interpreter import IN_INTERPRETER, fix_interpreter, ptxas_log, require_triton, run_under_interpreter
from worker_svc.attention.metadata import AttnMetadata

require_triton()

needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")

if IN_INTERPRETER:
    fix_interpreter()

    from worker_svc.attention import triton_backend as tk
    from worker_svc.attention.backend import QKNormRope
    from worker_svc.layers import fused


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(__file__)


def _arg_type(name: str, fp8_cache: bool = False) -> str:
    if fp8_cache and name in ("k_cache_ptr", "v_cache_ptr"):
        return "*fp8e4nv"
    if name == "slot_mapping_ptr":
        return "*i64"
    if name in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "order_ptr", "tickets_ptr"):
        return "*i32"
    if name == "positions_ptr":
        return "*i64"
    if name in ("mid_o_ptr", "mid_lse_ptr", "cos_ptr", "sin_ptr"):
        return "*fp32"
    return "*bf16" if name.endswith("_ptr") else "fp32" if name in ("scale_log2", "eps") else "i32"


def _compile_sm90(
    fn: object,
    consts: dict[str, int | bool],
    num_warps: int,
    num_stages: int,
    fp_fusion: bool = True,
    fp8_cache: bool = False,
) -> tuple[str, str]:
    """AOT-compile a kernel for the H100 (no GPU needed) as the runtime would specialise it: bf16
    data (an fp8 KV cache if asked), 16-byte aligned pointers and strides (block-table rows
    excepted). Returns the PTX and ptxas's log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names  # type: ignore[attr-defined]
    sig = {n: "constexpr" if n in consts else _arg_type(n, fp8_cache) for n in names}
    aligned = [i for i, n in enumerate(names) if (sig[n][0] == "*" or "stride" in n) and n != "stride_bt"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn, sig, consts, attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fp_fusion}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return kernel.asm["ptx"], ptxas_log(kernel.asm["ptx"])


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="needs the compiling (non-interpreted) kernels")
def test_kernels_compile_for_h100_without_spills() -> None:
    """The interpreter never lowers to PTX; this catches kernels that would fail to compile on the
    H100, or spill registers, at the benchmark's shapes (Qwen3-0.6B: 16 q / 8 kv heads, D 128)."""
    pytest.importorskip("triton.backends.nvidia")
    from worker_svc.attention import triton_backend as tb
    from worker_svc.attention import triton_kernels as k

    d = {"HEAD_DIM": 128, "BLOCK_SIZE": 16}
    dec = {**d, "GROUP": 2, "BLOCK_H": 16, "BLOCK_N": 64, "ORDERED": True, "DOT_PRECISION": "tf32", "ROPE": False}
    dec |= {"GROUP_POW2": 2, "NUM_Q_HEADS": 16, "SATURATE": False, "FUSED_MERGE": False, "RELEASE": False}
    dec |= {"MIXED": False}
    split = {**dec, "MIN_SPLIT_LEN": 128, "SPLIT": True, "SPLITS_POW2": 32}  # any count of splits
    # a single sequence's, as TritonBackend.attend_rope launches it: its tiles, no row order,
    # releasing the o projection after its keys
    one_seq = {**split, "ROPE": True, "FUSED_MERGE": True, "BLOCK_N": tb.ONE_SEQ_BLOCK_N}
    one_seq |= {"ORDERED": False, "RELEASE": True}
    pre = {**d, "GROUP": 2, "BLOCK_M": 128, "BLOCK_N": 64, "DOT_PRECISION": "tf32"}
    builds = [
        (k.store_kvcache_kernel, {"NUM_KV_HEADS": 8, "HEADS_POW2": 8, "HEAD_DIM": 128}, 4, 1),
        (k.decode_split_kernel, {**dec, "MIN_SPLIT_LEN": 1, "SPLIT": False, "SPLITS_POW2": 1}, 4, 3),
        (k.decode_split_kernel, split, 4, 3),
        (k.decode_split_kernel, {**dec, "MIN_SPLIT_LEN": 1, "SPLIT": False, "SPLITS_POW2": 1, "ROPE": True}, 4, 3),
        (k.decode_split_kernel, {**split, "ROPE": True}, 4, 3),
        (k.decode_split_kernel, {**split, "FUSED_MERGE": True}, 4, 3),
        (k.decode_split_kernel, {**split, "ROPE": True, "FUSED_MERGE": True}, 4, 3),
        (k.decode_split_kernel, one_seq, 4, 3),
        # a mixed step's one-token rows, as TritonBackend.attend launches them
        (k.decode_split_kernel, {**dec, "MIN_SPLIT_LEN": 1, "SPLIT": False, "SPLITS_POW2": 1, "MIXED": True}, 4, 3),
        (k.decode_split_kernel, {**split, "FUSED_MERGE": True, "ORDERED": False, "MIXED": True}, 4, 3),
        (k.decode_merge_kernel, {"NUM_HEADS": 16, "HEAD_DIM": 128, "NUM_SPLITS": 8, "SPLITS_POW2": 8}, 4, 1),
        (k.prefill_kernel, {**pre, "PAGED": True, "PACKED": True}, 8, 3),
        (k.prefill_kernel, {**pre, "PAGED": False, "PACKED": True}, 8, 3),
        (k.prefill_kernel, {**pre, "PAGED": False, "PACKED": False}, 8, 3),  # prompts of one tile
        (k.prefill_kernel, {**pre, "PAGED": True, "BLOCK_M": 16, "PACKED": False}, 4, 3),  # a mixed batch's short rows
    ]
    fp8 = [  # an fp8 cache: fp16 dots, two warps a program
        (k.decode_split_kernel, {**dec, "MIN_SPLIT_LEN": 1, "SPLIT": False, "SPLITS_POW2": 1}, 2, 3),
        (k.decode_split_kernel, {**split, "ROPE": True, "SATURATE": True, "FUSED_MERGE": True}, 2, 3),
    ]
    for (fn, consts, warps, stages), fp8_cache in [(b, False) for b in builds] + [(b, True) for b in fp8]:
        fusion = not consts.get("ROPE", False)
        ptx, log = _compile_sm90(fn, consts, warps, stages, fp_fusion=fusion, fp8_cache=fp8_cache)
        assert " 0 bytes spill stores" in log, f"{fn.__name__} {consts} fp8 cache {fp8_cache}: {log}"
        # the next kernel is released only where asked (and never waited for: decode attention launches plainly)
        assert ("griddepcontrol.launch_dependents" in ptx) == consts.get("RELEASE", False), consts
        assert "griddepcontrol.wait" not in ptx


HEAD_DIM, NUM_HEADS, NUM_KV_HEADS = 16, 4, 2


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per sequence: gather the context through the block table, causal softmax with prefix offset."""
    out = torch.zeros_like(q)
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for s in range(seq_lens.shape[0]):
        q0, q1, ctx = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(seq_lens[s])
        if q1 == q0 or ctx == 0:
            continue
        blocks = block_tables[s, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).double()
        v = v_cache[blocks].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1).double()
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), k) * scale
        qpos = ctx - (q1 - q0) + torch.arange(q1 - q0)
        visible = torch.arange(ctx)[None, :] <= qpos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def make_batch(
    ctx_lens: list[int],
    q_lens: list[int],
    block_size: int,
    seed: int,
    heads: tuple[int, int] = (NUM_HEADS, NUM_KV_HEADS),
    head_dim: int = HEAD_DIM,
) -> tuple[torch.Tensor, ...]:
    """Random paged cache (shuffled block ids) already holding each prefix, new q/k/v, and metadata."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    # Padding entries point far outside the cache: reading one would crash or corrupt the result.
    block_tables = torch.full((len(ctx_lens), max(blocks_per_seq + [1]) + 1), 10**6, dtype=torch.int32)
    slots, taken = [], 0
    for s, (ctx, ql) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        table = perm[taken : taken + blocks_per_seq[s]]
        taken += blocks_per_seq[s]
        block_tables[s, : len(table)] = table.int()
        pos = torch.arange(ctx - ql, ctx)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
    shape = (num_blocks, block_size, heads[1], head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = sum(q_lens)
    q = torch.randn(t, heads[0], head_dim, generator=g)
    k = torch.randn(t, heads[1], head_dim, generator=g)
    v = torch.randn(t, heads[1], head_dim, generator=g)
    slot_mapping = torch.cat(slots).long()
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, qsl


@pytest.mark.parametrize("mixed", [False, True])
def test_split_count_compiles_no_variant_of_its_own(monkeypatch: pytest.MonkeyPatch, mixed: bool) -> None:
    """An eager step picks its split count from its sequences (any of 2..MAX_SPLITS): were the count
    among the kernel's constexprs, a count that start-up never met would compile mid-serving, every
    stream stalled for about a second. Launches are recorded here, not run."""
    from worker_svc.attention import triton_backend as tb

    launches: list[tuple[tuple[int, ...], dict]] = []

    class Recorder:
        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:  # a JITFunction's launch
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(tb, "decode_split_kernel", Recorder())
    q_lens = [1, 40, 1] if mixed else [1, 1, 1]
    q, _, _, k_cache, v_cache, _, tables, seq_lens, qsl = make_batch([700, 90, 4000], q_lens, 16, seed=0)
    tickets = torch.zeros(3 * NUM_KV_HEADS, dtype=torch.int32)
    for splits in range(2, tb.MAX_SPLITS + 1):
        extra = {"out": torch.empty_like(q), "query_start_loc": qsl} if mixed else {}
        tb.decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, splits, tickets=tickets, **extra)
    assert [grid[2] for grid, _ in launches] == list(range(2, tb.MAX_SPLITS + 1))
    assert all(kwargs == launches[0][1] for _, kwargs in launches)  # constexprs and compile options


@needs_interpreter
def test_store_kvcache_skips_negative_slots_and_accepts_strided_inputs() -> None:
    q, k, v, k_cache, v_cache, slots, *_ = make_batch([5, 20, 33], [5, 4, 9], block_size=16, seed=0)
    slots[3] = -1  # e.g. a padded token: must not be written anywhere
    # k/v as views into a fused qkv buffer (token stride != kv_heads * head_dim).
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    kv_off, kv_width = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    k_view = qkv[:, kv_off : kv_off + kv_width].view(-1, NUM_KV_HEADS, HEAD_DIM)
    v_view = qkv[:, kv_off + kv_width :].view(-1, NUM_KV_HEADS, HEAD_DIM)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    exp_k.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots[keep]] = k[keep]
    exp_v.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots[keep]] = v[keep]
    tk.store_kvcache(k_view, v_view, k_cache, v_cache, slots)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)


@needs_interpreter
@pytest.mark.parametrize(
    ("ctx_lens", "q_lens", "block_size", "tiles", "split"),
    [
        ([37, 16, 1, 17], [37, 16, 1, 17], 16, (None, None), False),  # plain prefill, block boundaries
        ([50, 96, 40], [13, 70, 40], 16, (16, 16), False),  # cached prefixes, multi-tile, both loop phases
        ([83, 70, 9, 129], [1, 1, 9, 30], 32, (None, None), False),  # mixed: decode rows + chunked prefill
        ([83, 70, 9, 129, 99], [1, 16, 9, 17, 80], 16, (None, None), True),  # same, short rows split off
        ([300, 5], [21, 5], 64, (16, 32), False),  # block_size > BLOCK_N, long prefix
        ([1, 40, 2, 60, 16, 17, 5], [1, 33, 2, 47, 16, 17, 5], 16, (16, 16), False),  # packed slots, tile edges
        ([2] * 130 + [45] + [3] * 130 + [41], [1] * 130 + [40] + [2] * 130 + [41], 16, (16, 16), False),  # > 256 seqs
    ],
)
def test_prefill_attention_matches_reference(
    ctx_lens: list[int], q_lens: list[int], block_size: int, tiles: tuple[int | None, int | None], split: bool
) -> None:
    q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, qsl = make_batch(
        ctx_lens, q_lens, block_size, seed=len(ctx_lens) + block_size
    )
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    scale = HEAD_DIM**-0.5
    out = torch.full_like(q, float("nan"))  # every element must be written
    tk.prefill_attention(
        q, k_cache, v_cache, block_tables, seq_lens, qsl, max(q_lens), scale,
        split_short=split, out=out, block_m=tiles[0], block_n=tiles[1],
    )  # fmt: skip
    ref = reference_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("shorts", [False, True])
def test_mixed_step_decode_rows_in_decode_kernel(num_splits: int, shorts: bool) -> None:
    """A mixed step as the backend runs it: the one-token rows through the decode kernel (located by
    query_start_loc; with splits, merged through tickets), the rest through the prefill kernel,
    into one output whose every row is written once."""
    q_lens = [1, 40, 1, 9, 23, 1] if shorts else [1, 40, 1, 23, 1]
    ctx_lens = [83, 70, 150, 9, 29, 2] if shorts else [83, 70, 150, 29, 2]
    q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, qsl = make_batch(ctx_lens, q_lens, 16, seed=num_splits)
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    out = torch.full_like(q, float("nan"))
    tickets = torch.zeros(len(ctx_lens) * NUM_KV_HEADS, dtype=torch.int32)
    tk.decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, 0.3, num_splits, out=out, tickets=tickets, query_start_loc=qsl
    )
    assert not tickets.any()
    singles = qsl[1:] - qsl[:-1] == 1
    rows = qsl[:-1][singles].long()
    others = torch.ones(len(q), dtype=torch.bool)
    others[rows] = False
    assert not out[rows].isnan().any() and out[others].isnan().all()  # exactly the one-token rows
    tk.prefill_attention(
        q, k_cache, v_cache, block_tables, seq_lens, qsl, max(q_lens), 0.3,
        split_short=True, out=out, skip_single=True, short_rows=shorts,
    )  # fmt: skip
    ref = reference_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("tiles", [(None, None), (16, 16)])
def test_prefill_from_new_kv_without_cache(tiles: tuple[int | None, int | None]) -> None:
    lens = [1, 40, 17, 16]
    q, k, v, k_cache, v_cache, slots, block_tables, seq_lens, qsl = make_batch(lens, lens, 16, seed=7)
    out = tk.prefill_attention(
        q, k, v, block_tables, seq_lens, qsl, max(lens), 0.25, paged=False, block_m=tiles[0], block_n=tiles[1]
    )
    tk.store_kvcache(k, v, k_cache, v_cache, slots)  # only so the reference can read the context
    ref = reference_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(
    ("ctx_lens", "block_size", "num_splits", "heads", "head_dim"),
    [
        ([1, 16, 17, 64, 100], 16, 1, (4, 2), 16),  # ragged, exact block boundaries, single split
        ([1, 16, 17, 64, 300], 16, 3, (4, 2), 16),  # split-K; short sequences leave splits empty
        ([200, 129, 0], 32, 4, (4, 2), 16),  # seq_len 0 = CUDA-graph padding row: zeros, not NaN
        ([513, 40], 128, 2, (4, 2), 16),  # block_size > BLOCK_N
        ([70, 33], 16, 1, (2, 2), 32),  # MHA (group 1), head_dim 32
        ([90, 1], 16, 2, (16, 2), 16),  # group 8
        ([60], 16, 5, (32, 1), 16),  # group 32 > 16: BLOCK_H grows past tl.dot's minimum
    ],
)
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("fused_merge", [False, True])
def test_decode_attention_matches_reference(
    ctx_lens: list[int],
    block_size: int,
    num_splits: int,
    heads: tuple[int, int],
    head_dim: int,
    ordered: bool,
    fused_merge: bool,
) -> None:
    """With splits, the partials are merged by a merge kernel or (fused_merge) by each (sequence, kv
    head)'s last split, which leaves its ticket zeroed for the next launch."""
    q_lens = [1 if c > 0 else 0 for c in ctx_lens]
    _, k, v, k_cache, v_cache, slots, block_tables, seq_lens, _ = make_batch(
        ctx_lens, q_lens, block_size, seed=num_splits, heads=heads, head_dim=head_dim
    )
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    # Decode gives every sequence one row, padded ones included; q is a strided view of a qkv buffer.
    num_seqs = len(ctx_lens)
    qkv = torch.randn(num_seqs, (heads[0] + 2 * heads[1]) * head_dim)
    qd = qkv[:, : heads[0] * head_dim].view(num_seqs, heads[0], head_dim)
    out = torch.full((num_seqs, heads[0], head_dim), float("nan"))
    # Longest first, as prepare() orders decode steps: each program must still write its own row.
    order = torch.argsort(seq_lens, descending=True, stable=True).int() if ordered else None
    tickets = torch.zeros(num_seqs * heads[1], dtype=torch.int32) if fused_merge else None
    for _ in range(2):  # the second launch reuses the tickets the first left
        out.fill_(float("nan"))
        tk.decode_attention(
            qd, k_cache, v_cache, block_tables, seq_lens, 0.3, num_splits, out=out, order=order, tickets=tickets
        )
        assert tickets is None or not tickets.any()
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32)
    ref = reference_attention(qd.contiguous(), k_cache, v_cache, block_tables, seq_lens, qsl, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("block_n", [None, 128])  # 128: the one-row tiles
def test_decode_with_rope_equals_rope_kernel_then_decode(
    num_splits: int, cache_dtype: torch.dtype, block_n: int | None
) -> None:
    """decode_attention(rope=...) on a raw qkv row against what it replaces: qk_norm_rope storing k
    and v, then decode_attention. The new tokens' slots hold stale values beforehand, so a key loop
    that read one before its store would differ. Same outputs and caches, bit for bit."""
    heads, head_dim, eps = (4, 2), 32, 1e-6
    dtype = torch.float16 if cache_dtype != torch.float32 else torch.float32
    ctx_lens = [40, 1, 0, 17]  # a one-token context, and a padding row (no context, slot -1)
    q_lens = [1 if c else 0 for c in ctx_lens]
    *_, k_cache, v_cache, slots, tables, seq_lens, _ = make_batch(
        ctx_lens, q_lens, 16, seed=num_splits, heads=heads, head_dim=head_dim
    )
    slots = torch.cat([slots[:2], torch.tensor([-1]), slots[2:]])
    k_cache, v_cache = (c.to(cache_dtype) for c in (k_cache, v_cache))
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(len(ctx_lens), (heads[0] + 2 * heads[1]) * head_dim, generator=g).to(dtype)
    positions = (seq_lens - 1).clamp(min=0).long()
    angles = torch.arange(64)[:, None] / 10000 ** (torch.arange(head_dim // 2) / (head_dim // 2))
    w = (1 + 0.3 * torch.randn(2, head_dim, generator=g)).to(dtype)
    rope = QKNormRope(w[0], w[1], angles.cos(), angles.sin(), positions, eps)
    outs, caches = [], []
    for fuse in (False, True):
        x, kc, vc = qkv.clone(), k_cache.clone(), v_cache.clone()
        q = x[:, : heads[0] * head_dim].view(-1, heads[0], head_dim)
        if not fuse:
            fused.qk_norm_rope(x, positions, rope.cos, rope.sin, *w, *heads, eps, (kc, vc, slots))
        args = (q, kc, vc, tables, seq_lens, 0.3, num_splits)
        extra = {"rope": rope, "slot_mapping": slots} if fuse else {}
        outs.append(tk.decode_attention(*args, block_n=block_n, **extra))
        caches.append(torch.stack([kc, vc]).view(torch.uint8))
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])
    assert not torch.equal(caches[0], torch.stack([k_cache, v_cache]).view(torch.uint8))  # something was stored


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_bf16_over_fp8_cache(num_splits: int) -> None:
    """A bf16 query over an fp8 cache takes the fp16 dots: it must match the fp32 reference over the
    same widened cache to bf16's precision, in tiles across block boundaries."""
    ctx_lens = [300, 1, 129]
    _, k, v, k_cache, v_cache, slots, tables, seq_lens, _ = make_batch(ctx_lens, [1, 1, 1], 16, seed=5)
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    q = torch.randn(len(ctx_lens), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    out = tk.decode_attention(q.to(torch.bfloat16), k8, v8, tables, seq_lens, 0.3, num_splits)
    qsl = torch.arange(len(ctx_lens) + 1, dtype=torch.int32)
    ref = reference_attention(q.to(torch.bfloat16).float(), k8.float(), v8.float(), tables, seq_lens, qsl, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def _meta(
    slots: torch.Tensor, qsl: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor, prefix: bool
) -> AttnMetadata:
    q_lens, ctx = (qsl[1:] - qsl[:-1]).tolist(), seq_lens.tolist()
    return AttnMetadata(
        slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
        max_query_len=max(q_lens), max_seq_len=max(ctx), query_start_loc_host=qsl.tolist(),
        seq_lens_host=ctx, is_decode=all(n == 1 for n in q_lens), has_prefix=prefix,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("num_sms", [132, 1])  # 1 SM: decode takes the split-K + merge path
def test_backend_prefill_chunk_then_decode(num_sms: int) -> None:
    """The backend's dispatch over a sequence's life: fresh prefill, chunked continuation, decode."""
    backend = tk.TritonBackend(num_sms=num_sms)
    final = [150, 40, 32]
    q, k, v, k_cache, v_cache, slots, tables, _, _ = make_batch(final, final, 16, seed=11)
    # fresh prompts (no cache read) -> a chunk next to a 1-token row (split_short) -> pure decode
    steps = [([0, 0, 0], [60, 40, 30]), ([60, 40, 30], [89, 0, 1]), ([149, 40, 31], [1, 0, 1])]
    for done, new in steps:
        rows = [i for i, n in enumerate(new) if n]  # sequences taking part in this step
        tok = torch.cat([torch.arange(done[i], done[i] + new[i]) + sum(final[:i]) for i in rows])
        qsl = torch.tensor([0, *torch.tensor([new[i] for i in rows]).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor([done[i] + new[i] for i in rows], dtype=torch.int32)
        meta = _meta(slots[tok], qsl, seq_lens, tables[rows], prefix=any(done))
        backend.store(k[tok], v[tok], k_cache, v_cache, meta)
        out = backend.attend(q[tok], k[tok], v[tok], k_cache, v_cache, meta, 0.2)
        ref = reference_attention(q[tok], k_cache, v_cache, tables[rows], seq_lens, qsl, 0.2)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_choose_num_splits() -> None:
    assert tk.choose_num_splits(256, 8, 1024, 132) == 1  # big batch fills the GPU: no merge
    assert tk.choose_num_splits(1, 8, 1024, 132) == 1024 // tk.MIN_SPLIT_LEN
    assert tk.choose_num_splits(1, 8, 40960, 132) == tk.MAX_SPLITS
    assert tk.choose_num_splits(64, 8, 4096, 132) == 2
