"""The flash-attn backend's call contract, on the CPU, against a fake `flash_attn` module.

No machine here has flash-attn or a GPU, so these tests check what the backend controls: that it
imports lazily, fails early with the fix in the message, stores K/V without a host sync, and calls
flash-attn with the arguments its docs and flash_api.cpp require. The fake computes attention with
plain torch math from exactly those arguments (cu_seqlens, block_table, cache_seqlens, causal), so
a wrong argument shows up as a wrong output against TorchBackend. Whether the real kernels agree is
left to a GPU run.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from worker_svc.attention import AttnMetadata, get_backend
from worker_svc.attention import flash_backend as fb
from worker_svc.attention.torch_backend import TorchBackend

BLOCK = 256  # the smallest block size flash-attn 2.x pages accept
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = HEAD_DIM**-0.5


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [L, H, D] over k, v [C, Hkv, D] in float32. causal: flash-attn's bottom-right alignment,
    query i sees keys <= C - L + i. Query head h reads kv head h // (H / Hkv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("lhd,chd->hlc", q.float(), k) * scale
    if causal:
        length, ctx = q.shape[0], k.shape[0]
        allowed = torch.ones(length, ctx, dtype=torch.bool).tril(ctx - length)
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hlc,chd->lhd", scores.softmax(-1), v).to(q.dtype)


def _check_index(t: torch.Tensor, name: str) -> None:
    assert t.dtype == torch.int32, f"{name} must be int32"
    assert t.stride(-1) == 1, f"{name} must have a contiguous last dim"


def _check_paged(cache: torch.Tensor) -> None:
    assert cache.dim() == 4 and cache.shape[1] % 256 == 0, "flash-attn 2.x: page size divisible by 256"


def _paged(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    return cache[table.long()].flatten(0, 1)[:length]


class FakeFlashAttn:
    """The two flash-attn 2.x entry points the backend calls, with their documented signatures:
    argument checks mirror flash_api.cpp, the math is the plain reference. Records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def module(self, version: str = "2.8.3") -> types.ModuleType:
        mod = types.ModuleType("flash_attn")
        mod.__version__ = version  # type: ignore[attr-defined]
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func  # type: ignore[attr-defined]
        mod.flash_attn_with_kvcache = self.flash_attn_with_kvcache  # type: ignore[attr-defined]
        return mod

    def flash_attn_varlen_func(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
        softmax_scale: float | None = None, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
        return_attn_probs: bool = False, block_table: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        self.calls.append(("varlen", {**locals(), "self": None}))
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        _check_index(cu_seqlens_q, "cu_seqlens_q")
        _check_index(cu_seqlens_k, "cu_seqlens_k")
        assert cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous()
        batch = cu_seqlens_q.numel() - 1
        assert cu_seqlens_k.shape == (batch + 1,)
        if block_table is not None:
            _check_index(block_table, "block_table")
            _check_paged(k)
            assert block_table.shape[0] == batch
        out = torch.empty_like(q)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(batch):
            q_len, k_len = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            # The kernel sizes its grid and loops from the max lengths: a short bound loses tokens.
            assert q_len <= max_seqlen_q and k_len <= max_seqlen_k
            if block_table is None:
                keys, values = k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
            else:
                keys, values = _paged(k, block_table[b], k_len), _paged(v, block_table[b], k_len)
            scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
            out[cq[b] : cq[b + 1]] = _attention(q[cq[b] : cq[b + 1]], keys, values, scale, causal)
        return out

    def flash_attn_with_kvcache(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None = None,
        v: torch.Tensor | None = None, rotary_cos: torch.Tensor | None = None,
        rotary_sin: torch.Tensor | None = None, cache_seqlens: int | torch.Tensor | None = None,
        cache_batch_idx: torch.Tensor | None = None, cache_leftpad: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None, softmax_scale: float | None = None, causal: bool = False,
        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, rotary_interleaved: bool = True,
        alibi_slopes: torch.Tensor | None = None, num_splits: int = 0, return_softmax_lse: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        self.calls.append(("kvcache", {**locals(), "self": None}))
        assert q.dim() == 4 and q.dtype in (torch.float16, torch.bfloat16)
        assert k is None and v is None, "the backend stores K/V itself"
        assert isinstance(cache_seqlens, torch.Tensor) and block_table is not None
        _check_index(cache_seqlens, "cache_seqlens")
        assert cache_seqlens.is_contiguous() and cache_seqlens.shape == (q.shape[0],)
        _check_index(block_table, "block_table")
        _check_paged(k_cache)
        assert block_table.shape[0] == q.shape[0]
        out = torch.empty_like(q)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        for b, length in enumerate(cache_seqlens.tolist()):
            keys, values = _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length)
            out[b] = _attention(q[b], keys, values, scale, causal)
        return out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFlashAttn:
    impl = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", impl.module())
    return impl


@pytest.fixture
def blocked_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if flash-attn were not installed, also where it is (None in sys.modules fails the import)."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)


@dataclass
class Step:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttnMetadata


def make_step(
    ctx: list[int], qlen: list[int], dtype: torch.dtype = torch.bfloat16, block_size: int = BLOCK, seed: int = 0
) -> Step:
    """Caches holding each seq's prefix (ctx - qlen tokens) in shuffled blocks, and this step's
    q/k/v for the last qlen tokens of each seq, with metadata as `batch.prepare` builds it."""
    gen = torch.Generator().manual_seed(seed)
    nblk = [-(-c // block_size) for c in ctx]
    perm = torch.randperm(sum(nblk) + 2, generator=gen)
    width = max(nblk) + 1  # wider than needed, like the padded tables of a real batch
    tables = torch.zeros(len(ctx), width, dtype=torch.int32)
    shape = (sum(nblk) + 2, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots, used = [], 0
    for i, (c, n) in enumerate(zip(ctx, qlen, strict=True)):
        tables[i, : nblk[i]] = perm[used : used + nblk[i]].int()
        used += nblk[i]
        pos = torch.arange(c - n, c)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    total = sum(qlen)
    q = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    loc = [0]
    for n in qlen:
        loc.append(loc[-1] + n)
    meta = AttnMetadata(
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(loc, dtype=torch.int32),
        seq_lens=torch.tensor(ctx, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(qlen),
        max_seq_len=max(ctx),
        query_start_loc_host=loc,
        seq_lens_host=list(ctx),
        is_decode=all(n == 1 for n in qlen),
        has_prefix=any(c > n for c, n in zip(ctx, qlen, strict=True)),
    )
    return Step(q, k, v, k_cache, v_cache, meta)


def run_layer(backend: Any, s: Step) -> torch.Tensor:
    """What PagedAttention.forward does: store this step's K/V, then attend."""
    backend.store(s.k, s.v, s.k_cache, s.v_cache, s.meta)
    return backend.attend(s.q, s.k, s.v, s.k_cache, s.v_cache, s.meta, SCALE)


def reference(s: Step) -> torch.Tensor:
    """TorchBackend on float32 copies of the same inputs (caches before this step's store)."""
    f32 = Step(*(t.float() for t in (s.q, s.k, s.v, s.k_cache, s.v_cache)), s.meta)
    return run_layer(TorchBackend(), f32)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_module_imports_without_flash_attn(blocked_flash_attn: None) -> None:
    module = importlib.reload(fb)  # re-runs the module's top level with flash_attn unimportable
    assert module.FlashAttnBackend.name == "flash-attn"


def test_missing_flash_attn_names_the_fix(blocked_flash_attn: None) -> None:
    with pytest.raises(ImportError, match=r"nanovllm-grpc\[flash\].*--attention-backend triton"):
        fb.FlashAttnBackend()
    # get_backend reaches the same error on a CUDA device (construction touches no device).
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        get_backend("flash-attn", "cuda")


def test_flash_backend_needs_cuda() -> None:
    with pytest.raises(ValueError, match="needs device 'cuda'"):
        get_backend("flash-attn", "cpu")


def test_old_flash_attn_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", FakeFlashAttn().module(version="2.5.6"))
    with pytest.raises(ImportError, match=r"flash-attn >= 2\.6, found 2\.5\.6"):
        fb.FlashAttnBackend()


def test_build_without_cuda_extension_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # flash_attn/__init__.py swallows a missing CUDA module and then lacks the functions.
    bare = types.ModuleType("flash_attn")
    bare.__version__ = "2.8.3"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", bare)
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        fb.FlashAttnBackend()


@pytest.mark.parametrize("block_size", [16, 128, 320])
def test_small_block_size_is_refused_at_store(fake: FakeFlashAttn, block_size: int) -> None:
    s = make_step([5], [5], block_size=block_size)
    with pytest.raises(ValueError, match=r"--kvcache-block-size 256.*--attention-backend triton"):
        fb.FlashAttnBackend().store(s.k, s.v, s.k_cache, s.v_cache, s.meta)
    # On CUDA the q/k kernel may store instead (fuses_store), skipping `store`: refused there too.
    with pytest.raises(ValueError, match=r"--kvcache-block-size 256.*--attention-backend triton"):
        fb.FlashAttnBackend().fuses_store(s.k_cache)


def test_paged_store_may_be_fused(fake: FakeFlashAttn) -> None:
    # flash-attn reads the layout store_kvcache writes, so the model's kernel may write it instead.
    assert fb.FlashAttnBackend().fuses_store(make_step([5], [5]).k_cache)


def test_float32_is_refused_at_attend(fake: FakeFlashAttn) -> None:
    s = make_step([5], [5], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"float16 or bfloat16.*--dtype bfloat16"):
        fb.FlashAttnBackend().attend(s.q, s.k, s.v, s.k_cache, s.v_cache, s.meta, SCALE)
    assert fake.calls == []


def test_prefill_from_scratch_reads_new_kv_not_the_cache(fake: FakeFlashAttn) -> None:
    # has_prefix False: the warm-up runs this path before the cache exists (empty cache tensors).
    s = make_step([7, 300, 1], [7, 300, 1], dtype=torch.float16)
    empty = torch.empty(0)
    out = fb.FlashAttnBackend().attend(s.q, s.k, s.v, empty, empty, s.meta, SCALE)
    assert_close(out, reference(s))
    (name, args), *rest = fake.calls
    assert name == "varlen" and not rest
    assert args["k"] is s.k and args["v"] is s.v and args["block_table"] is None
    assert args["cu_seqlens_q"] is s.meta.query_start_loc and args["cu_seqlens_k"] is s.meta.query_start_loc
    assert args["max_seqlen_q"] == args["max_seqlen_k"] == 300
    assert args["causal"] is True and args["softmax_scale"] == SCALE


def test_one_token_prompts_take_the_prefill_path(fake: FakeFlashAttn) -> None:
    # is_decode but no prefix: still nothing to read from the cache.
    s = make_step([1, 1, 1], [1, 1, 1])
    out = run_layer(fb.FlashAttnBackend(), s)
    assert_close(out, reference(s))
    assert [name for name, _ in fake.calls] == ["varlen"]
    assert fake.calls[0][1]["block_table"] is None


@pytest.mark.parametrize(
    ("ctx", "qlen"),
    [
        ([300, 40], [20, 40]),  # a chunk after a cached prefix (across a block boundary), and a prompt
        ([600, 257, 33], [1, 257, 5]),  # mixed: a decode row, a prompt, a chunk
    ],
)
def test_prefill_with_prefix_reads_the_paged_cache(fake: FakeFlashAttn, ctx: list[int], qlen: list[int]) -> None:
    s = make_step(ctx, qlen)
    ref = reference(s)
    out = run_layer(fb.FlashAttnBackend(), s)
    assert_close(out, ref)
    (name, args), *rest = fake.calls
    assert name == "varlen" and not rest
    assert args["k"] is s.k_cache and args["v"] is s.v_cache
    assert args["block_table"] is s.meta.block_tables
    assert args["cu_seqlens_q"] is s.meta.query_start_loc
    assert args["cu_seqlens_k"].tolist() == [0, *torch.tensor(ctx).cumsum(0).tolist()]
    assert (args["max_seqlen_q"], args["max_seqlen_k"]) == (max(qlen), max(ctx))
    assert args["causal"] is True and args["softmax_scale"] == SCALE


def test_decode_reads_the_paged_cache(fake: FakeFlashAttn) -> None:
    s = make_step([513, 3, 256, 257], [1, 1, 1, 1])
    ref = reference(s)
    out = run_layer(fb.FlashAttnBackend(), s)
    assert out.shape == s.q.shape
    assert_close(out, ref)
    (name, args), *rest = fake.calls
    assert name == "kvcache" and not rest
    assert args["q"].shape == (4, 1, HEADS, HEAD_DIM)
    assert args["k_cache"] is s.k_cache and args["v_cache"] is s.v_cache
    assert args["cache_seqlens"] is s.meta.seq_lens and args["block_table"] is s.meta.block_tables
    assert args["causal"] is True and args["softmax_scale"] == SCALE


def test_decode_uses_only_graph_static_metadata(fake: FakeFlashAttn) -> None:
    """As in a decode CUDA graph: the host lists and max_seq_len hold the capture's bounds, not
    this step's values, and padding rows have seq_len 1 and slot -1. The output must not change."""
    max_model_len = 4096
    s = make_step([513, 3, 1, 1], [1, 1, 1, 1])
    s.meta.slot_mapping[2:] = -1
    s.meta.block_tables[2:] = 0
    ref = reference(s)[:2]
    graph_meta = replace(
        s.meta,
        max_seq_len=max_model_len,
        query_start_loc_host=list(range(5)),
        seq_lens_host=[max_model_len] * 4,
    )
    out = run_layer(fb.FlashAttnBackend(), replace(s, meta=graph_meta))
    assert_close(out[:2], ref)


def test_store_writes_slots_and_skips_padding(fake: FakeFlashAttn) -> None:
    s = make_step([300, 5, 1, 1], [3, 5, 1, 1])
    s.meta.slot_mapping[-2:] = -1  # padding rows, as a CUDA graph pads a batch
    want_k, want_v = s.k_cache.clone(), s.v_cache.clone()
    TorchBackend().store(s.k, s.v, want_k, want_v, s.meta)
    fb.FlashAttnBackend().store(s.k, s.v, s.k_cache, s.v_cache, s.meta)
    assert torch.equal(s.k_cache, want_k) and torch.equal(s.v_cache, want_v)


@pytest.mark.parametrize("leading_padding", [0, 2])
def test_scatter_kv_matches_the_torch_store(leading_padding: int) -> None:
    s = make_step([300, 9], [6, 9])
    s.meta.slot_mapping[:leading_padding] = -1  # the first stored row is not row 0
    s.meta.slot_mapping[-1] = -1
    want_k, want_v = s.k_cache.clone(), s.v_cache.clone()
    TorchBackend().store(s.k, s.v, want_k, want_v, s.meta)
    fb.scatter_kv(s.k, s.v, s.k_cache, s.v_cache, s.meta.slot_mapping)
    assert torch.equal(s.k_cache, want_k) and torch.equal(s.v_cache, want_v)


def test_scatter_kv_with_only_padding_changes_nothing() -> None:
    # The CUDA-graph capture stores with every slot -1.
    s = make_step([4], [4])
    s.meta.slot_mapping.fill_(-1)
    before_k, before_v = s.k_cache.clone(), s.v_cache.clone()
    fb.scatter_kv(s.k, s.v, s.k_cache, s.v_cache, s.meta.slot_mapping)
    assert torch.equal(s.k_cache, before_k) and torch.equal(s.v_cache, before_v)


def test_scatter_kv_padding_does_not_clobber_a_real_write() -> None:
    # Padding rows around a real write to slot 0, the slot a padding row falls back to.
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(2, 4, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(4, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    slots = torch.tensor([-1, 0, 5, -1])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for cache, new in ((want_k, k), (want_v, v)):
        cache.view(-1, KV_HEADS, HEAD_DIM)[[0, 5]] = new[[1, 2]]
    fb.scatter_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
