"""The flash-attn-4 backend's call contract, on the CPU, against a fake `flash_attn.cute` module.

As for flash-attn 2.x (test_flash_backend.py): no machine here has flash-attn-4 or a GPU, so these
tests check what the backend controls. The fake's checks are the ones flash-attn-4 4.0.0b40's
`_flash_attn_fwd` makes (interface.py), and it computes attention with plain torch math from
exactly the arguments it is given (cu_seqlens_q, seqused_k, page_table, causal), so a wrong or
missing argument shows up as a wrong output against TorchBackend. The real kernels are left to
tests/gpu/check_flash.py.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from typing import Any

import pytest
import torch

from tests.test_flash_backend import HEADS, SCALE, FakeFlashAttn, _attention, _paged, assert_close, make_step
from tests.test_flash_backend import reference as torch_reference
from tests.test_flash_backend import run_layer as layer
from worker_svc.attention import flash4_backend as fb4
from worker_svc.attention import flash_backend as fb
from worker_svc.attention import get_backend
from worker_svc.attention.torch_backend import TorchBackend

HOPPER = (9, 0)


def _check_int32(t: torch.Tensor, name: str) -> None:
    assert t.dtype == torch.int32, f"{name} must be int32"
    assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim"


class FakeFlashAttn4:
    """flash_attn.cute.flash_attn_varlen_func: its keyword arguments and checks, reference math.
    Records every call; returns (out, lse) as the real one does."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def flash_attn_varlen_func(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qv: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, min_seqlen_k: int | None = None,
        seqused_q: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
        gather_kv_indices: torch.Tensor | None = None, page_table: torch.Tensor | None = None,
        softmax_scale: float | None = None, causal: bool = False, num_splits: int = 1, **rest: Any,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        self.calls.append({k_: v_ for k_, v_ in locals().items() if k_ not in ("self", "rest")})
        assert not rest and qv is None and seqused_q is None and num_splits == 1
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        if cu_seqlens_q is None:  # batch layout [batch, seqlen_q, heads, head_dim]
            assert q.dim() == 4
            batch, q_loc = q.shape[0], [i * q.shape[1] for i in range(q.shape[0] + 1)]
            rows = q.flatten(0, 1)
        else:
            _check_int32(cu_seqlens_q, "cu_seqlens_q")
            batch, q_loc, rows = cu_seqlens_q.numel() - 1, cu_seqlens_q.tolist(), q
            assert isinstance(max_seqlen_q, int)
        if page_table is not None:
            assert cu_seqlens_k is None, "page_table is not supported with cu_seqlens_k"
            _check_int32(page_table, "page_table")
            assert page_table.shape[0] == batch and k.dim() == 4
            assert seqused_k is not None, "without seqused_k every page of the table counts"
        if seqused_k is not None:
            _check_int32(seqused_k, "seqused_k")
            assert seqused_k.shape == (batch,)
        if cu_seqlens_k is not None:
            _check_int32(cu_seqlens_k, "cu_seqlens_k")
            assert cu_seqlens_k.shape == (batch + 1,)
        assert isinstance(max_seqlen_k, int)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out = torch.empty_like(rows)
        for b in range(batch):
            q0, q1 = q_loc[b], q_loc[b + 1]
            assert q1 - q0 <= (max_seqlen_q if max_seqlen_q is not None else q.shape[1])
            if page_table is not None:
                length = int(seqused_k[b])
                keys, values = _paged(k, page_table[b], length), _paged(v, page_table[b], length)
            else:
                k0, k1 = cu_seqlens_k[b].item(), cu_seqlens_k[b + 1].item()
                keys, values = k[k0:k1], v[k0:k1]
            assert keys.shape[0] <= max_seqlen_k, "max_seqlen_k bounds every context"
            out[q0:q1] = _attention(rows[q0:q1], keys, values, scale, causal)
        return out.view(q.shape), None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFlashAttn4:
    """flash-attn-4 4.0.0b40 alone: `flash_attn` is a namespace package around `cute`."""
    impl = FakeFlashAttn4()
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = impl.flash_attn_varlen_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(fb4, "installed_version", lambda: "4.0.0b40")
    monkeypatch.setattr(fb, "installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: HOPPER)
    return impl


def test_version_order() -> None:
    assert fb4.version_key("4.0.0b4") < fb4.MIN_VERSION <= fb4.version_key("4.0.0b5")
    assert fb4.version_key("4.0.0b5") < fb4.version_key("4.0.0b40") < fb4.version_key("4.0.0")
    assert fb4.version_key("4.0.0") < fb4.version_key("4.1.0b1")


def test_missing_or_old_flash_attn_4_names_the_fix(fake: FakeFlashAttn4, monkeypatch: pytest.MonkeyPatch) -> None:
    for version, found in ((None, "none"), ("4.0.0b4", "4.0.0b4")):
        monkeypatch.setattr(fb4, "installed_version", lambda v=version: v)
        with pytest.raises(ImportError, match=rf"4\.0\.0b5 or later.*found {found}.*--attention-backend triton"):
            fb4.FlashAttn4Backend()


def test_unimportable_runtime_names_the_fix(fake: FakeFlashAttn4, monkeypatch: pytest.MonkeyPatch) -> None:
    # Installed, but e.g. without nvidia-cutlass-dsl: importing flash_attn.cute fails.
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    with pytest.raises(ImportError, match=r"4\.0\.0b40 is installed but flash_attn\.cute does not import"):
        fb4.FlashAttn4Backend()


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (12, 0)])
def test_gpus_without_paged_kernels_are_refused(fake: FakeFlashAttn4, capability: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"9\.x to 11\.x.*not {capability[0]}\.{capability[1]}.*flash-attn 2\.x"):
        fb4.FlashAttn4Backend(capability)


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (10, 3), (11, 0)])
def test_hopper_and_blackwell_are_accepted(fake: FakeFlashAttn4, capability: tuple[int, int]) -> None:
    assert fb4.FlashAttn4Backend(capability).name == "flash-attn"


def test_flash_attn_name_picks_flash_attn_4_where_it_alone_is_installed(
    fake: FakeFlashAttn4, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(get_backend("flash-attn", "cuda"), fb4.FlashAttn4Backend)
    # Both installed: flash-attn 2.x, the path tested longest (here the fake 2.x module).
    monkeypatch.setattr(fb, "installed", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", FakeFlashAttn().module())
    assert isinstance(get_backend("flash-attn", "cuda"), fb.FlashAttnBackend)


def test_auto_leaves_flash_attn_4_alone(fake: FakeFlashAttn4) -> None:
    # flash-attn-4 makes `flash_attn` importable, which auto once took for flash-attn 2.x.
    assert get_backend("auto", "cuda", block_size=256).name == "triton"


@pytest.mark.parametrize("block_size", [16, 48, 128, 256])
def test_any_block_size_is_accepted(fake: FakeFlashAttn4, block_size: int) -> None:
    s = make_step([300, 40], [20, 40], block_size=block_size)
    backend = fb4.FlashAttn4Backend()
    assert backend.fuses_store(s.k_cache)
    assert_close(layer(backend, s), torch_reference(s))


@pytest.mark.parametrize("head_dim", [72, 512])
def test_head_dims_it_cannot_page_are_refused(fake: FakeFlashAttn4, head_dim: int) -> None:
    cache = torch.zeros(2, 16, 2, head_dim, dtype=torch.bfloat16)
    new = torch.zeros(1, 2, head_dim, dtype=torch.bfloat16)
    meta = make_step([1], [1]).meta
    backend = fb4.FlashAttn4Backend()
    with pytest.raises(ValueError, match=rf"divisible by 16, up to 256; this model's is {head_dim}"):
        backend.store(new, new, cache, cache, meta)
    with pytest.raises(ValueError, match="--attention-backend triton"):
        backend.fuses_store(cache)


def test_float32_is_refused_at_attend(fake: FakeFlashAttn4) -> None:
    s = make_step([5], [5], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"float16 or bfloat16.*--dtype bfloat16"):
        fb4.FlashAttn4Backend().attend(s.q, s.k, s.v, s.k_cache, s.v_cache, s.meta, SCALE)
    assert fake.calls == []


def test_prefill_from_scratch_reads_new_kv_not_the_cache(fake: FakeFlashAttn4) -> None:
    s = make_step([7, 300, 1], [7, 300, 1], dtype=torch.float16)
    empty = torch.empty(0)  # the warm-up runs before the cache exists
    out = fb4.FlashAttn4Backend().attend(s.q, s.k, s.v, empty, empty, s.meta, SCALE)
    assert_close(out, torch_reference(s))
    (args,) = fake.calls
    assert args["k"] is s.k and args["v"] is s.v and args["page_table"] is None
    assert args["cu_seqlens_q"] is s.meta.query_start_loc and args["cu_seqlens_k"] is s.meta.query_start_loc
    assert args["max_seqlen_q"] == args["max_seqlen_k"] == 300
    assert args["causal"] is True and args["softmax_scale"] == SCALE


@pytest.mark.parametrize(
    ("ctx", "qlen"),
    [
        ([300, 40], [20, 40]),  # a chunk after a cached prefix (across a block boundary), and a prompt
        ([600, 257, 33], [1, 257, 5]),  # mixed: a decode row, a prompt, a chunk
    ],
)
def test_prefill_with_prefix_reads_the_paged_cache(fake: FakeFlashAttn4, ctx: list[int], qlen: list[int]) -> None:
    s = make_step(ctx, qlen, block_size=16)
    ref = torch_reference(s)
    assert_close(layer(fb4.FlashAttn4Backend(), s), ref)
    (args,) = fake.calls
    assert args["k"] is s.k_cache and args["v"] is s.v_cache
    assert args["page_table"] is s.meta.block_tables and args["seqused_k"] is s.meta.seq_lens
    assert args["cu_seqlens_q"] is s.meta.query_start_loc and args["cu_seqlens_k"] is None
    assert (args["max_seqlen_q"], args["max_seqlen_k"]) == (max(qlen), max(ctx))
    assert args["causal"] is True and args["softmax_scale"] == SCALE


def test_decode_reads_the_paged_cache(fake: FakeFlashAttn4) -> None:
    s = make_step([513, 3, 256, 257], [1, 1, 1, 1], block_size=16)
    ref = torch_reference(s)
    out = layer(fb4.FlashAttn4Backend(), s)
    assert out.shape == s.q.shape
    assert_close(out, ref)
    (args,) = fake.calls
    assert args["q"].shape == (4, 1, HEADS, s.q.shape[-1]) and args["cu_seqlens_q"] is None
    assert args["page_table"] is s.meta.block_tables and args["seqused_k"] is s.meta.seq_lens
    assert args["causal"] is True and args["softmax_scale"] == SCALE


def test_decode_uses_only_graph_static_metadata(fake: FakeFlashAttn4) -> None:
    """As in a decode CUDA graph: the host lists and max_seq_len hold the capture's bounds, and
    padding rows have seq_len 1, slot -1 and block 0. The output must not change."""
    max_model_len = 4096
    s = make_step([513, 3, 1, 1], [1, 1, 1, 1], block_size=16)
    s.meta.slot_mapping[2:] = -1
    s.meta.block_tables[2:] = 0
    ref = torch_reference(s)[:2]
    graph_meta = replace(
        s.meta, max_seq_len=max_model_len, query_start_loc_host=list(range(5)), seq_lens_host=[max_model_len] * 4
    )
    out = layer(fb4.FlashAttn4Backend(), replace(s, meta=graph_meta))
    assert_close(out[:2], ref)
    assert fake.calls[0]["max_seqlen_k"] == max_model_len


def test_store_writes_slots_and_skips_padding(fake: FakeFlashAttn4) -> None:
    s = make_step([300, 5, 1, 1], [3, 5, 1, 1], block_size=16)
    s.meta.slot_mapping[-2:] = -1
    want_k, want_v = s.k_cache.clone(), s.v_cache.clone()
    TorchBackend().store(s.k, s.v, want_k, want_v, s.meta)
    fb4.FlashAttn4Backend().store(s.k, s.v, s.k_cache, s.v_cache, s.meta)
    assert torch.equal(s.k_cache, want_k) and torch.equal(s.v_cache, want_v)
