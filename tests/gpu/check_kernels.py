"""Triton kernels on a GPU (attention, the fused norm / RoPE / SiLU kernels of layers/fused.py and the
KV-cache store fused into the RoPE one or into decode attention, the one-row matmuls of
layers/gemv.py, and sampling): correctness vs a torch reference, then timings.

Run on the H100 from the repo root:  PYTHONPATH=. python3 tests/gpu/check_kernels.py [--seed N] [--sweep]
Every run draws fresh random inputs (the seed is printed). Output buffers are filled with NaN first,
so an element the kernel forgot to write shows up. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.testing

from worker_svc import sampling_kernel as sk
from worker_svc.attention import QKNormRope
from worker_svc.attention import triton_backend as tb
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.layers import fused, gemv
from worker_svc.layers.activation import SiluAndMul
from worker_svc.layers.linear import GEMV_ROWS
from worker_svc.layers.norm import RMSNorm
from worker_svc.layers.rotary import RotaryEmbedding, apply_rotary
from worker_svc.sampler import Sampler
from worker_svc.seq_state import SamplingOptions, SeqState

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
QWEN3 = {"heads": (16, 8), "head_dim": 128}  # Qwen3-0.6B attention shape
HIDDEN, MLP, MAX_POS, EPS = 1024, 3072, 40960, 1e-6  # the rest of its layer
FAILURES: list[str] = []
DEV = "cuda"  # a CPU smoke run of this script (under TRITON_INTERPRET=1) may switch it


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttnMetadata


def make_case(
    ctx: list[int], qlen: list[int], dtype: torch.dtype, heads: tuple[int, int] = (16, 8), head_dim: int = 128,
    block_size: int = 16, bound: int | None = None, fill: bool = True,
) -> Case:  # fmt: skip
    """Caches holding each prefix (shuffled block ids), the step's new q/k/v, and the metadata."""
    nblk = [-(-c // block_size) for c in ctx]
    perm = torch.randperm(sum(nblk) + 5, device=DEV)
    tables = torch.zeros(len(ctx), max(nblk) + 2, dtype=torch.int32, device=DEV)
    slots, used = [], 0
    for i, (c, n) in enumerate(zip(ctx, qlen, strict=True)):
        tables[i, : nblk[i]] = perm[used : used + nblk[i]].int()
        used += nblk[i]
        pos = torch.arange(c - n, c, device=DEV)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    shape = (sum(nblk) + 5, block_size, heads[1], head_dim)
    make = torch.randn if fill else torch.empty
    k_cache, v_cache = make(shape, dtype=dtype, device=DEV), make(shape, dtype=dtype, device=DEV)
    t = sum(qlen)
    q, k, v = (torch.randn(t, h, head_dim, dtype=dtype, device=DEV) for h in (heads[0], heads[1], heads[1]))
    cu = [0]
    for n in qlen:
        cu.append(cu[-1] + n)
    meta = AttnMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(cu, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV), block_tables=tables,
        max_query_len=max(qlen), max_seq_len=bound or max(ctx), query_start_loc_host=cu, seq_lens_host=ctx,
        is_decode=all(n == 1 for n in qlen), has_prefix=any(c > n for c, n in zip(ctx, qlen, strict=True)),
    )  # fmt: skip
    return Case(q, k, v, k_cache, v_cache, meta)


def reference(c: Case, scale: float) -> torch.Tensor:
    """fp32 per-sequence attention over the context gathered through the block table."""
    out = torch.zeros(c.q.shape, dtype=torch.float32, device=DEV)
    bs, group = c.k_cache.shape[1], c.q.shape[1] // c.k_cache.shape[2]
    loc, lens = c.meta.query_start_loc_host, c.meta.seq_lens_host
    for i, ctx in enumerate(lens):
        q0, q1 = loc[i], loc[i + 1]
        blocks = c.meta.block_tables[i, : -(-ctx // bs)].long()
        k = c.k_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(group, 1)
        v = c.v_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", c.q[q0:q1].float(), k) * scale
        qpos = torch.arange(ctx - (q1 - q0), ctx, device=DEV)
        s = s.masked_fill(torch.arange(ctx, device=DEV)[None, :] > qpos[:, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def report(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    nan = bool(torch.isnan(out).any())
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    ok = not nan and err < TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name:<64} rel_err {err:.2e}{'  NaN!' if nan else ''}")
    if not ok:
        FAILURES.append(name)


def poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def rand_lens(n: int, lo: int, hi: int, bs: int = 16) -> list[int]:
    """Random lengths, a third of them pinned to a block boundary or one past it."""
    lens = [random.randint(lo, hi) for _ in range(n)]
    for i in range(0, n, 3):
        lens[i] = max(lo, min(hi, (lens[i] // bs) * bs + (i // 3) % 2))
    return lens


def check_store(dtype: torch.dtype) -> None:
    ctx = rand_lens(64, 1, 600)
    c = make_case(ctx, [random.randint(1, x) for x in ctx], dtype)
    c.meta.slot_mapping[::7] = -1  # skipped tokens must not land anywhere
    # k/v as strided views of one fused qkv buffer, as the model produces them.
    qkv = torch.cat([c.q.flatten(1), c.k.flatten(1), c.v.flatten(1)], 1)
    w = c.k[0].numel()
    k, v = (qkv[:, -2 * w : -w].view_as(c.k), qkv[:, -w:].view_as(c.v))
    exp_k, exp_v, keep = c.k_cache.clone(), c.v_cache.clone(), c.meta.slot_mapping >= 0
    exp_k.view(-1, *c.k.shape[1:])[c.meta.slot_mapping[keep]] = c.k[keep]
    exp_v.view(-1, *c.v.shape[1:])[c.meta.slot_mapping[keep]] = c.v[keep]
    tb.store_kvcache(k, v, c.k_cache, c.v_cache, c.meta.slot_mapping)
    ok = torch.equal(c.k_cache, exp_k) and torch.equal(c.v_cache, exp_v)
    print(f"{'ok  ' if ok else 'FAIL'} store_kvcache {dtype} (strided k/v, -1 slots)")
    if not ok:
        FAILURES.append(f"store {dtype}")


def check_prefill(dtype: torch.dtype) -> None:
    b = tb.TritonBackend()
    cases: list[tuple[str, list[int], list[int], dict]] = []
    fresh = rand_lens(7, 1, 1500)
    cases.append(("fresh prompts b=7", fresh, fresh, {}))
    ctx = rand_lens(7, 1, 4096)
    cases.append(("cached prefix b=7 ctx<=4096", ctx, [random.randint(1, min(x, 600)) for x in ctx], {}))
    ctx = rand_lens(64, 1, 4096)
    q = [1 if i % 2 else random.randint(1, min(x, 256)) for i, x in enumerate(ctx)]
    cases.append(("mixed decode + chunks b=64", ctx, q, {}))
    ctx = rand_lens(256, 1, 2048)
    cases.append(("mixed small chunks b=256", ctx, [random.randint(1, min(x, 16)) for x in ctx], {}))
    ctx = rand_lens(5, 1, 3000, 256)
    cases.append(("block_size 256", ctx, [random.randint(1, x) for x in ctx], {"block_size": 256}))
    ctx = rand_lens(5, 1, 2000)
    q = [random.randint(1, x) for x in ctx]
    cases.append(("head_dim 64, 32q/8kv", ctx, q, {"head_dim": 64, "heads": (32, 8)}))
    cases.append(("head_dim 256, 12q/3kv", ctx, q, {"head_dim": 256, "heads": (12, 3), "block_size": 64}))
    for name, ctx, q, kw in cases:
        c = make_case(ctx, q, dtype, **kw)
        scale = c.q.shape[-1] ** -0.5
        tb.store_kvcache(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)
        m = c.meta
        ref = reference(c, scale)
        args = (m.block_tables, m.seq_lens, m.query_start_loc, m.max_query_len, scale)
        out = tb.prefill_attention(c.q, c.k_cache, c.v_cache, *args, out=poisoned(c.q))
        report(f"prefill paged {name} {dtype}", out, ref, dtype)
        # The other paths the backend takes: fresh prompts read the new k/v (no cache); mixed
        # batches give the short rows their own 16-row-tile launch and the one-token rows the
        # decode kernel (one split and several, the latter merged by tickets).
        if not m.has_prefix:
            out = tb.prefill_attention(c.q, c.k, c.v, *args, paged=False, out=poisoned(c.q))
            report(f"prefill flat  {name} {dtype}", out, ref, dtype)
        singles, shorts = b.mix(m)
        for splits in (1, 4) if singles else (1,) if shorts else ():
            out = poisoned(c.q)
            if singles:
                tb.decode_attention(
                    c.q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, scale, splits, out=out,
                    tickets=b.tickets(c.q.device), query_start_loc=m.query_start_loc,
                )  # fmt: skip
            tb.prefill_attention(
                c.q, c.k_cache, c.v_cache, *args, split_short=True, out=out, skip_single=singles, short_rows=shorts
            )
            report(f"prefill split {name} (decode splits {splits}) {dtype}", out, ref, dtype)


def check_decode(dtype: torch.dtype) -> None:
    sms = tb.device_num_sms(torch.device(DEV))
    tickets = torch.zeros(tb.MERGE_TICKETS, dtype=torch.int32, device=DEV)  # as the backend keeps them
    for batch, max_ctx in ((1, 4096), (7, 4096), (64, 4096), (256, 2048), (512, 1024)):
        ctx = rand_lens(batch, 1, max_ctx)
        c = make_case(ctx, [1] * len(ctx), dtype)
        tb.store_kvcache(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)
        ref = reference(c, 0.088)
        auto = tb.choose_num_splits(batch, 8, max(ctx), sms)
        longest_first = torch.argsort(c.meta.seq_lens, descending=True, stable=True).int()
        for splits in sorted({auto, 1, 5, tb.choose_num_splits(batch, 8, 40960, sms)}):
            for order, merge_tickets in ((None, None), (longest_first, None), (longest_first, tickets)):
                out = poisoned(c.q)
                m = c.meta
                args = (c.q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, 0.088, splits)
                tb.decode_attention(*args, out=out, order=order, tickets=merge_tickets)
                label = " longest first" if order is not None else ""
                label += " fused merge" if merge_tickets is not None and splits > 1 else ""
                report(f"decode b={batch} ctx<={max_ctx} splits={splits}{label} {dtype}", out, ref, dtype)
                if merge_tickets is not None and splits > 1:
                    # The last split reads the others' partials: a missed ordering would show as a
                    # launch that differs from the first, or a ticket not reset.
                    again = [
                        tb.decode_attention(*args, out=poisoned(c.q), order=order, tickets=tickets) for _ in range(50)
                    ]
                    same = all(torch.equal(a, out) for a in again) and not tickets.any()
                    print(f"  50 launches more: {'identical, tickets reset' if same else 'DIFFER'}")
                    FAILURES.extend([] if same else [f"fused merge b={batch} splits={splits} {dtype}"])


def fp8_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float8 e4m3 values at each element of x (fp32): 3 mantissa bits, and the
    subnormals' fixed spacing below 2^-6."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-6)))) / 8


def check_fp8_cache(dtype: torch.dtype) -> None:
    """An fp8 (e4m3) cache: the store rounds (and saturates) like torch's cast, and decode and paged
    prefill read it widened, matching the fp32 reference over the same rounded cache."""
    fp8 = torch.float8_e4m3fn
    ctx = rand_lens(64, 1, 2048)
    for name, q in (
        ("decode b=64", [1] * len(ctx)),
        ("prefill chunks b=64", [random.randint(1, min(x, 200)) for x in ctx]),
    ):
        c = make_case(ctx, q, dtype)
        c.k_cache, c.v_cache = c.k_cache.to(fp8), c.v_cache.to(fp8)
        c.k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 3e-3])  # saturates, stays, rounds
        # Byte views: indexing into float8 tensors is not implemented everywhere.
        exp_k, keep = c.k_cache.clone().view(torch.uint8), c.meta.slot_mapping >= 0
        narrowed = c.k[keep].clamp(-448, 448).to(fp8)  # what the store promises: saturate, then round
        exp_k.view(-1, *c.k.shape[1:])[c.meta.slot_mapping[keep]] = narrowed.view(torch.uint8)
        tb.store_kvcache(c.k, c.v, c.k_cache, c.v_cache, c.meta.slot_mapping)
        # Triton may narrow through fp16 (two roundings) where torch rounds once: allow a value one
        # fp8 step from torch's, never more, and the saturated and exact values must be equal.
        got, want = c.k_cache.float(), exp_k.view(fp8).float()
        same = (c.k_cache.view(torch.uint8) == exp_k).float().mean().item()
        ok = bool(((got - want).abs() <= fp8_step(want)).all())
        ok = ok and got.view(-1, *c.k.shape[1:])[c.meta.slot_mapping[0], 0, :3].tolist() == [448.0, -448.0, 448.0]
        print(
            f"{'ok  ' if ok else 'FAIL'} store_kvcache into fp8 {name} {dtype}: {same:.4%} bytes as torch's cast, "
            "the rest one fp8 step off, +-1000 saturated to +-448"
        )
        if not ok:
            FAILURES.append(f"fp8 store {name} {dtype}")
        scale = c.q.shape[-1] ** -0.5
        ref = reference(replace(c, k_cache=c.k_cache.float(), v_cache=c.v_cache.float()), scale)
        out = poisoned(c.q)
        m = c.meta
        if m.is_decode:
            splits = tb.choose_num_splits(len(ctx), 8, max(ctx), tb.device_num_sms(torch.device(DEV)))
            tb.decode_attention(c.q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, scale, splits, out=out)
        else:
            out = tb.TritonBackend().attend(c.q, c.k, c.v, c.k_cache, c.v_cache, m, scale)
        report(f"fp8 cache {name} {dtype}", out, ref, dtype)


def check_cuda_graph(dtype: torch.dtype) -> None:
    """Capture backend.attend for decode with a loose length bound, then replay on new data."""
    b = tb.TritonBackend()
    for batch in (7, 64):
        c = make_case([4096] * batch, [1] * batch, dtype, bound=8192)  # room for any length <= 4096
        c.meta.decode_order = torch.arange(batch, dtype=torch.int32, device=DEV)  # refilled per replay
        b.attend(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, 0.1)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = b.attend(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, 0.1)
        for _ in range(2):
            new = rand_lens(batch, 1, 4096)
            c.meta.seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
            c.meta.seq_lens_host = new
            c.meta.block_tables.copy_(c.meta.block_tables[torch.randperm(batch, device=DEV)])
            c.meta.decode_order.copy_(torch.argsort(c.meta.seq_lens, descending=True).int())
            c.q.normal_()
            out.fill_(float("nan"))
            graph.replay()
            report(f"decode CUDA-graph replay b={batch} {dtype}", out, reference(c, 0.1), dtype)


def report_rounding(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """A fused kernel vs the torch path it replaces, in the same dtype (bf16 or fp16).

    The requirement: no NaN, every output element written, relative error within the dtype's
    tolerance. Beyond it, the kernels are built to round wherever the torch path rounds (to the
    model dtype after each op), so the two may differ only where an fp32-level difference (a sum of
    squares in another order, rsqrt.approx or ex2.approx against torch's functions) happens to tip
    one rounding. Four checks, each against a failure the others miss:

    - no NaN or inf;
    - relative error ||out - ref|| / ||ref|| <= eps(dtype), one rounding's worth: the requirement;
    - every element within 4 ulps at its row's scale (the ulp of the row's largest |ref|). A tipped
      rounding moves its value by an ulp of its own, a weight up to ~2 can double that, and RoPE
      adds two such terms (|cos|, |sin| <= 1): <= 4. A wrong index, an unwritten element (in place
      it keeps its input; a new output holds whatever the memory held, and the inputs are fresh
      random numbers) or a lost weight is off by about the row's scale: ~2^7 (bf16) or ~2^10 (fp16)
      of these ulps;
    - a mean-error bound, on the share of elements that are not bit-equal: <= 1%. A misplaced
      rounding (one skipped, e.g. a product contracted into the next add as an FMA, or one added)
      changes the last bit of 20-27% of elements, each by an ulp or two, which only the share
      shows. Tipped roundings change well under 1%: add_rms_norm and silu_and_mul measured >= 99%
      bit-equal on an H100, and RoPE with rstd 8 fp32 ulps off, simulated on the CPU, 99.9% in
      bf16 and 99.86% in fp16. The mean in ulps (printed) would be a weaker bound, as it depends
      on the data: the same misplaced rounding averages 0.04 ulps of the row scale in RoPE's rows
      but 0.013 in silu's heavy-tailed ones. (The rounding it was built to catch: an FMA that fuses
      RoPE's `round(a * b) - round(c * d)` into fma.rn.bf16; see fused._EXACT_ROUNDING.)
    """
    finite = bool(torch.isfinite(out).all())
    diff = out.float() - ref.float()
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    scale = ref.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(ref.dtype).tiny)
    ulps = diff.abs() / (torch.finfo(ref.dtype).eps * torch.exp2(torch.floor(torch.log2(scale))))
    worst, mean = ulps.max().item(), ulps.mean().item()
    equal = (out == ref).float().mean().item()
    ok = finite and rel <= torch.finfo(ref.dtype).eps and worst <= 4 and equal >= 0.99
    detail = f"bit-equal {equal:8.4%}  worst {worst:.1f} ulp  mean {mean:.4f} ulp  rel_err {rel:.1e}"
    print(f"{'ok  ' if ok else 'FAIL'} {name:<64} {detail}" + "  NaN/inf!" * (not finite))
    if not ok:
        FAILURES.append(name)


@dataclass
class LayerParts:
    norm: RMSNorm
    q_norm: RMSNorm
    k_norm: RMSNorm
    rotary: RotaryEmbedding


def layer_parts(dtype: torch.dtype) -> LayerParts:
    """Norms with random weights in `dtype` (as loaded checkpoints have) and fp32 RoPE tables."""
    norms = [RMSNorm(n, EPS).to(DEV) for n in (HIDDEN, QWEN3["head_dim"], QWEN3["head_dim"])]
    for n in norms:
        n.weight.data = (1 + 0.3 * torch.randn(n.weight.shape, device=DEV)).to(dtype)
    return LayerParts(*norms, RotaryEmbedding(QWEN3["head_dim"], MAX_POS, 1e6).to(DEV))


def qk_norm_rope_torch(
    qkv: torch.Tensor, positions: torch.Tensor, p: LayerParts, heads: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, hq, D] and k [T, hkv, D] the way Qwen3Attention's CPU path computes them."""
    d = QWEN3["head_dim"]
    q, k, _ = qkv.split([heads[0] * d, heads[1] * d, heads[1] * d], dim=-1)
    cos, sin = p.rotary(positions, qkv.dtype)
    q = apply_rotary(p.q_norm.add_norm_torch(q.reshape(-1, heads[0], d), None)[0], cos, sin)
    k = apply_rotary(p.k_norm.add_norm_torch(k.reshape(-1, heads[1], d), None)[0], cos, sin)
    return q, k


def qk_norm_rope_fused(qkv: torch.Tensor, positions: torch.Tensor, p: LayerParts, heads: tuple[int, int]) -> None:
    fused.qk_norm_rope(qkv, positions, p.rotary.cos, p.rotary.sin, p.q_norm.weight, p.k_norm.weight, *heads, EPS)


def report_qk(
    name: str, before: torch.Tensor, after: torch.Tensor, positions: torch.Tensor, p: LayerParts, heads: tuple[int, int]
) -> None:
    """qkv after the fused kernel vs the torch path on qkv before it: q and k match, v untouched."""
    d = QWEN3["head_dim"]
    ref_q, ref_k = qk_norm_rope_torch(before, positions, p, heads)
    q, k, v = after.split([heads[0] * d, heads[1] * d, heads[1] * d], dim=-1)
    report_rounding(f"{name} q", q.reshape(ref_q.shape), ref_q)
    report_rounding(f"{name} k", k.reshape(ref_k.shape), ref_k)
    if not torch.equal(v, before[:, (heads[0] + heads[1]) * d :]):
        print(f"FAIL {name}: v changed")
        FAILURES.append(f"{name} v")


def check_fused(dtype: torch.dtype) -> None:
    p = layer_parts(dtype)
    d = QWEN3["head_dim"]
    for rows in (1, 7, 64, 256, 512):
        x = (3 * torch.randn(rows, HIDDEN, device=DEV)).to(dtype)
        for residual in (None, (5 * torch.randn(rows, HIDDEN, device=DEV)).to(dtype)):
            out, new_residual = fused.add_rms_norm(x, residual, p.norm.weight, EPS)
            ref, ref_residual = p.norm.add_norm_torch(x, residual)
            name = f"add_rms_norm b={rows} {'+ residual' if residual is not None else 'no residual'} {dtype}"
            report_rounding(name, out, ref)
            if not torch.equal(new_residual, ref_residual):  # one rounded add each: must be equal
                print(f"FAIL {name}: new residual differs")
                FAILURES.append(f"{name} residual")
        for heads in (QWEN3["heads"], (8, 4)):  # (8, 4): a TP=2 rank's share
            qkv = (2 * torch.randn(rows, (heads[0] + 2 * heads[1]) * d, device=DEV)).to(dtype)
            positions = torch.randint(0, MAX_POS, (rows,), device=DEV)
            before = qkv.clone()
            qk_norm_rope_fused(qkv, positions, p, heads)
            report_qk(f"qk_norm_rope b={rows} heads={heads} {dtype}", before, qkv, positions, p, heads)
        g = (3 * torch.randn(rows, 2 * MLP, device=DEV)).to(dtype)
        report_rounding(f"silu_and_mul b={rows} {dtype}", fused.silu_and_mul(g), SiluAndMul().forward_torch(g))


def check_gemv(dtype: torch.dtype, rows: int) -> None:
    """Each prologue at Qwen3-0.6B's projection shapes (TP=1 and a TP=2 rank's share), for `rows` rows: through an
    identity weight the output is the prologue's own, which must round like the torch ops; through
    a random weight the product must match fp32 math on the same (torch-path) input."""
    p = layer_parts(dtype)
    shapes = [(gemv.NORM, 4096, HIDDEN), (gemv.PLAIN, HIDDEN, 2048), (gemv.NORM, 2 * MLP, HIDDEN)]
    shapes += [(gemv.SILU, HIDDEN, MLP), (gemv.PLAIN, VOCAB, HIDDEN)]
    shapes += [(gemv.NORM, 2048, HIDDEN), (gemv.PLAIN, HIDDEN, 1024), (gemv.SILU, HIDDEN, 1536)]  # TP=2
    for prologue, n, k in shapes:
        x = (3 * torch.randn(rows, 2 * k if prologue == gemv.SILU else k, device=DEV)).to(dtype)
        for residual in (None, (5 * torch.randn(rows, k, device=DEV)).to(dtype)) if prologue == gemv.NORM else (None,):
            norm_w = p.norm.weight
            if prologue == gemv.SILU:
                ref_in, ref_res = SiluAndMul().forward_torch(x), None
            elif prologue == gemv.NORM:
                norm = RMSNorm(k, EPS).to(DEV)
                norm.weight.data = norm_w
                ref_in, ref_res = norm.add_norm_torch(x, residual)
            else:
                ref_in, ref_res = x, None
            name = f"gemv {['plain', 'norm', 'silu'][prologue]}{' + residual' if residual is not None else ''}"
            name += f" {n}x{k} {rows} rows {dtype}"
            if n == k or prologue != gemv.PLAIN:
                eye = torch.eye(k, dtype=dtype, device=DEV)
                report_rounding(f"{name} (identity)", gemv.gemv(x, eye, prologue, residual, norm_w, EPS)[0], ref_in)
            w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
            out, new_res = gemv.gemv(x, w, prologue, residual, norm_w, EPS)
            report(name, out, ref_in.float() @ w.float().T, dtype)
            if ref_res is not None and not torch.equal(new_res, ref_res):
                print(f"FAIL {name}: new residual differs")
                FAILURES.append(f"{name} residual")


def check_gemv_chain(dtype: torch.dtype, rows: int) -> None:
    """Four layers' few-row matmuls, each fed by the one before, captured in one CUDA graph as a decode
    step runs them (on sm_90 launched with programmatic dependent launch, so each may start before the
    one before it ends): every replay, on new inputs, must equal the same calls run one at a time
    with the device synchronised between them, bit for bit."""
    p = layer_parts(dtype)
    shapes = [(gemv.NORM, 4096, HIDDEN), (gemv.PLAIN, HIDDEN, 4096), (gemv.NORM, 2 * MLP, HIDDEN)]
    shapes += [(gemv.SILU, HIDDEN, MLP)]
    weights = [(torch.randn(n, k, device=DEV) / k**0.5).to(dtype) for _ in range(4) for _, n, k in shapes]
    x, residual = (torch.empty(rows, HIDDEN, dtype=dtype, device=DEV) for _ in range(2))

    def chain(sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, res = x, residual
        for i, w in enumerate(weights):
            prologue = shapes[i % len(shapes)][0]
            h, new_res = gemv.gemv(h, w, prologue, res if prologue == gemv.NORM else None, p.norm.weight, EPS)
            res = new_res if new_res is not None else res
            if sync:
                torch.cuda.synchronize()
        return h, res

    chain(False)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, out_res = chain(False)
    for i in range(3):
        x.copy_(3 * torch.randn(x.shape, device=DEV))
        residual.copy_(5 * torch.randn(residual.shape, device=DEV))
        graph.replay()
        ref, ref_res = chain(True)
        ok = torch.equal(out, ref) and torch.equal(out_res, ref_res)
        verdict(f"gemv chain of {len(weights)} x {rows} rows in a CUDA graph, replay {i} {dtype}", ok)


def check_fused_cuda_graph(dtype: torch.dtype) -> None:
    """The three fused launches captured in one graph, replayed on new inputs and positions."""
    p, rows, heads, d = layer_parts(dtype), 64, QWEN3["heads"], QWEN3["head_dim"]
    x, residual = torch.empty(rows, HIDDEN, dtype=dtype, device=DEV), torch.empty(rows, HIDDEN, dtype=dtype, device=DEV)
    qkv = torch.empty(rows, (heads[0] + 2 * heads[1]) * d, dtype=dtype, device=DEV)
    positions = torch.zeros(rows, dtype=torch.long, device=DEV)
    g = torch.empty(rows, 2 * MLP, dtype=dtype, device=DEV)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, new_residual = fused.add_rms_norm(x, residual, p.norm.weight, EPS)
        qk_norm_rope_fused(qkv, positions, p, heads)
        return out, new_residual, fused.silu_and_mul(g)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        for t, scale in ((x, 3), (residual, 5), (qkv, 2), (g, 3)):
            t.copy_(scale * torch.randn(t.shape, device=DEV))
        positions.copy_(torch.randint(0, MAX_POS, (rows,), device=DEV))
        qkv_in = qkv.clone()
        graph.replay()
        ref, ref_residual = p.norm.add_norm_torch(x, residual)
        report_rounding(f"CUDA-graph replay add_rms_norm b={rows} {dtype}", outs[0], ref)
        report_rounding(f"CUDA-graph replay add_rms_norm residual b={rows} {dtype}", outs[1], ref_residual)
        report_qk(f"CUDA-graph replay qk_norm_rope b={rows} {dtype}", qkv_in, qkv, positions, p, heads)
        report_rounding(f"CUDA-graph replay silu_and_mul b={rows} {dtype}", outs[2], SiluAndMul().forward_torch(g))


def fused_store_case(
    dtype: torch.dtype, heads: tuple[int, int] = QWEN3["heads"]
) -> tuple[torch.Tensor, torch.Tensor, Case, LayerParts]:
    """qkv rows for ragged sequences with cached prefixes (shuffled blocks, random caches), their
    positions, and the Case holding caches and metadata; every fifth token at slot -1."""
    ctx = rand_lens(24, 1, 600)
    c = make_case(ctx, [random.randint(1, x) for x in ctx], dtype, heads=heads)
    c.meta.slot_mapping[::5] = -1
    loc = c.meta.query_start_loc_host
    positions = torch.cat(
        [torch.arange(n - (loc[i + 1] - loc[i]), n, device=DEV) for i, n in enumerate(c.meta.seq_lens_host)]
    )
    qkv = (2 * torch.randn(positions.shape[0], (heads[0] + 2 * heads[1]) * QWEN3["head_dim"], device=DEV)).to(dtype)
    return qkv, positions, c, layer_parts(dtype)


def separate_store(qkv: torch.Tensor, positions: torch.Tensor, c: Case, p: LayerParts, heads: tuple[int, int]) -> None:
    """What the fused store replaces: the kernel in place, then the backend's store of k and v."""
    qk_norm_rope_fused(qkv, positions, p, heads)
    d, t = QWEN3["head_dim"], qkv.shape[0]
    k = qkv[:, heads[0] * d : (heads[0] + heads[1]) * d].view(t, heads[1], d)
    v = qkv[:, (heads[0] + heads[1]) * d :].view(t, heads[1], d)
    tb.store_kvcache(k, v, c.k_cache, c.v_cache, c.meta.slot_mapping)


def report_fused_store(name: str, qkv: torch.Tensor, c: Case, ref_qkv: torch.Tensor, ref: Case) -> None:
    """The same values from the same rounding: qkv and both whole caches must be bit-equal."""
    ok = torch.equal(qkv, ref_qkv) and torch.equal(c.k_cache, ref.k_cache) and torch.equal(c.v_cache, ref.v_cache)
    verdict(name, ok, "qkv and caches bit-equal to kernel + store_kvcache" if ok else "differs")


def check_fused_store(dtype: torch.dtype) -> None:
    """qk_norm_rope writing k/v into the paged cache (the model's decode and prefill path on the
    Triton and flash-attn backends) vs the kernel plus the separate store_kvcache."""
    for heads in (QWEN3["heads"], (8, 4)):
        qkv, positions, c, p = fused_store_case(dtype, heads)
        ref_qkv, ref = qkv.clone(), Case(c.q, c.k, c.v, c.k_cache.clone(), c.v_cache.clone(), c.meta)
        kv = (c.k_cache, c.v_cache, c.meta.slot_mapping)
        fused.qk_norm_rope(
            qkv, positions, p.rotary.cos, p.rotary.sin, p.q_norm.weight, p.k_norm.weight, *heads, EPS, kv
        )
        separate_store(ref_qkv, positions, ref, p, heads)
        report_fused_store(f"qk_norm_rope + cache store T={qkv.shape[0]} heads={heads} {dtype}", qkv, c, ref_qkv, ref)


def check_fused_store_cuda_graph(dtype: torch.dtype) -> None:
    """The fused store captured in a CUDA graph, replayed with new rows, positions and slots (the
    slot is read on the device), against the separate path run eagerly on the same inputs."""
    heads = QWEN3["heads"]
    qkv, positions, c, p = fused_store_case(dtype, heads)
    slots = c.meta.slot_mapping

    def step() -> None:
        cos, sin = p.rotary.cos, p.rotary.sin
        fused.qk_norm_rope(
            qkv, positions, cos, sin, p.q_norm.weight, p.k_norm.weight, *heads, EPS, (c.k_cache, c.v_cache, slots)
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        qkv.copy_(2 * torch.randn(qkv.shape, device=DEV))
        positions.copy_(torch.randint(0, MAX_POS, positions.shape, device=DEV))
        perm = torch.randperm(c.k_cache.shape[0] * c.k_cache.shape[1], device=DEV)[: slots.shape[0]]
        slots.copy_(torch.where(torch.rand(slots.shape, device=DEV) < 0.2, -1, perm))
        ref_qkv, ref = qkv.clone(), Case(c.q, c.k, c.v, c.k_cache.clone(), c.v_cache.clone(), c.meta)
        separate_store(ref_qkv, positions, ref, p, heads)
        graph.replay()
        report_fused_store(
            f"CUDA-graph replay qk_norm_rope + cache store T={qkv.shape[0]} {dtype}", qkv, c, ref_qkv, ref
        )


def decode_rope_case(batch: int, max_ctx: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> tuple:
    """A decode step as the model's attention sees it: raw qkv rows, positions (context - 1), and a
    Case whose caches hold random (stale) values at the new tokens' slots, every seventh row padding
    (context 0, slot -1) as in a CUDA graph's spare rows."""
    heads, d = QWEN3["heads"], QWEN3["head_dim"]
    ctx = rand_lens(batch, 1, max_ctx)
    c = make_case(ctx, [1] * batch, dtype)
    c.k_cache, c.v_cache = c.k_cache.to(cache_dtype), c.v_cache.to(cache_dtype)
    c.meta.seq_lens[6::7] = 0
    c.meta.slot_mapping[6::7] = -1
    positions = (c.meta.seq_lens.long() - 1).clamp_min(0)
    qkv = (2 * torch.randn(batch, (heads[0] + 2 * heads[1]) * d, device=DEV)).to(dtype)
    p = layer_parts(dtype)
    rope = QKNormRope(p.q_norm.weight, p.k_norm.weight, p.rotary.cos, p.rotary.sin, positions, EPS)
    return qkv, c, rope


def decode_rope_paths(qkv: torch.Tensor, c: Case, rope: QKNormRope, splits: int, fused_rope: bool) -> torch.Tensor:
    """Decode attention of the raw qkv rows, either with the norm/RoPE/store inside the decode kernel
    or as the model did before it (qk_norm_rope storing k and v, then decode_attention)."""
    heads, d, m = QWEN3["heads"], QWEN3["head_dim"], c.meta
    q = qkv[:, : heads[0] * d].view(-1, heads[0], d)
    if not fused_rope:
        kv = (c.k_cache, c.v_cache, m.slot_mapping)
        fused.qk_norm_rope(qkv, rope.positions, rope.cos, rope.sin, rope.q_weight, rope.k_weight, *heads, EPS, kv)
    extra = {"rope": rope, "slot_mapping": m.slot_mapping} if fused_rope else {}
    out = poisoned(q)
    return tb.decode_attention(q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, 0.088, splits, out=out, **extra)


def report_decode_rope(
    name: str, out: torch.Tensor, want: torch.Tensor, c: Case, ref: Case, dtype: torch.dtype
) -> None:
    """Against the separate path: the output within the dtype's tolerance (the fused kernel is built
    without FMA contraction, so its softmax arithmetic rounds a little differently); no cache slot
    but the new tokens' changed; and the new k and v as report_rounding demands of qk_norm_rope
    (the sums of squares run in another order there, so a rounding may tip), or, in an fp8 cache,
    >= 99% of bytes equal and the rest one fp8 step off."""
    report(name, out, want.float(), dtype)
    slots = c.meta.slot_mapping[c.meta.slot_mapping >= 0]
    for part, got, exp in (("k", c.k_cache, ref.k_cache), ("v", c.v_cache, ref.v_cache)):
        g, e = (x.view(torch.uint8).flatten(0, 1) for x in (got, exp))  # [slot, kv head, head_dim bytes]
        changed = (g != e).flatten(1).any(1)
        changed[slots] = False
        verdict(f"{name} {part}: other slots", not changed.any(), "untouched" if not changed.any() else "changed")
        g, e = g[slots].view(got.dtype), e[slots].view(got.dtype)
        if got.dtype != torch.float8_e4m3fn:
            report_rounding(f"{name} {part}", g, e)
            continue
        same = (g.view(torch.uint8) == e.view(torch.uint8)).float().mean().item()
        ok = same >= 0.99 and bool(((g.float() - e.float()).abs() <= fp8_step(e.float())).all())
        verdict(f"{name} {part}", ok, f"{same:.4%} of bytes equal, the rest one fp8 step off")


def slots_at(meta: AttnMetadata, pos: torch.Tensor) -> torch.Tensor:
    """The cache slot of each row's token at position pos (block size 16), through its block table."""
    return meta.block_tables[torch.arange(pos.shape[0], device=pos.device), pos // 16].long() * 16 + pos % 16


def check_decode_rope(dtype: torch.dtype) -> None:
    """decode_attention(rope=...) against the two launches it replaces (qk_norm_rope storing k and v,
    then decode_attention), at batch 1 to 512, one split and several, bf16/fp16 and fp8 caches; then
    replayed in a CUDA graph with new rows, contexts and slots."""
    sms = tb.device_num_sms(torch.device(DEV))
    for cache_dtype in (dtype, torch.float8_e4m3fn):
        for batch, max_ctx in ((1, 4096), (7, 4096), (64, 2048), (256, 2048), (512, 1024)):
            qkv, c, rope = decode_rope_case(batch, max_ctx, dtype, cache_dtype)
            for splits in sorted({1, tb.choose_num_splits(batch, 8, max_ctx, sms)}):
                ref = replace(c, k_cache=c.k_cache.clone(), v_cache=c.v_cache.clone())
                want = decode_rope_paths(qkv.clone(), ref, rope, splits, fused_rope=False)
                got = decode_rope_paths(qkv.clone(), c, rope, splits, fused_rope=True)
                name = f"decode with q/k norm + RoPE + store b={batch} splits={splits} {dtype} cache {cache_dtype}"
                report_decode_rope(name, got, want, c, ref, dtype)
    qkv, c, rope = decode_rope_case(64, 2048, dtype, dtype)
    splits = tb.choose_num_splits(64, 8, 2048, sms)
    raw = qkv.clone()
    out = decode_rope_paths(qkv, c, rope, splits, fused_rope=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_rope_paths(qkv, c, rope, splits, fused_rope=True)
    longest = torch.tensor(c.meta.seq_lens_host, device=DEV)  # what each row's blocks can hold
    for _ in range(2):
        raw.copy_(2 * torch.randn(raw.shape, device=DEV))
        qkv.copy_(raw)
        pos = (torch.rand(64, device=DEV) * longest).long()  # new contexts pos + 1 <= longest
        c.meta.seq_lens.copy_(pos + 1)
        rope.positions.copy_(pos)
        c.meta.slot_mapping.copy_(slots_at(c.meta, pos))
        ref = replace(c, k_cache=c.k_cache.clone(), v_cache=c.v_cache.clone())
        want = decode_rope_paths(raw.clone(), ref, rope, splits, fused_rope=False)
        graph.replay()
        name = f"CUDA-graph replay decode with q/k norm + RoPE + store b=64 {dtype}"
        report_decode_rope(name, out, want, c, ref, dtype)


def check_decode_release(dtype: torch.dtype) -> None:
    """Decode attention with the q/k norm and RoPE, releasing the o projection's GEMV (launched with
    PDL) after its keys, as one- and two-row decode steps run them: captured in one CUDA graph and
    replayed on new rows, both outputs must equal the same calls without the release, synchronised
    between them, bit for bit (the release changes when the GEMV starts, never what it reads)."""
    for rows in GEMV_ROWS:
        check_release_rows(dtype, rows)


def check_release_rows(dtype: torch.dtype, rows: int) -> None:
    heads, d = QWEN3["heads"], QWEN3["head_dim"]
    w_o = (torch.randn(HIDDEN, heads[0] * d, device=DEV) / (heads[0] * d) ** 0.5).to(dtype)
    qkv, c, rope = decode_rope_case(rows, 4096, dtype, dtype)
    m = c.meta
    m.seq_lens.clamp_(min=1)  # every row a real sequence, as a one- or two-row step's are
    last = m.seq_lens.long() - 1
    m.slot_mapping.copy_(slots_at(m, last))
    rope.positions.copy_(last)
    splits = tb.choose_num_splits(rows, 8, 4096, tb.device_num_sms(torch.device(DEV)))
    splits = min(splits, tb.ONE_SEQ_MAX_SPLITS) if rows == 1 else splits  # as TritonBackend.attend_rope picks
    tickets = torch.zeros(tb.MERGE_TICKETS, dtype=torch.int32, device=DEV)

    def step(x: torch.Tensor, release: bool, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q = x[:, : heads[0] * d].view(rows, heads[0], d)
        att = tb.decode_attention(
            q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, 0.088, splits, out=poisoned(q), rope=rope,
            slot_mapping=m.slot_mapping, tickets=tickets, block_n=tb.ONE_SEQ_BLOCK_N if rows == 1 else None,
            release=release,
        )  # fmt: skip
        if sync:
            torch.cuda.synchronize()
        return att, gemv.gemv(att.view(rows, -1), w_o, gemv.PLAIN, None, None, EPS)[0]

    raw = qkv.clone()
    step(qkv, True, False)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        att, o = step(qkv, True, False)
    for i in range(3):
        raw.copy_(2 * torch.randn(raw.shape, device=DEV))
        qkv.copy_(raw)
        graph.replay()
        torch.cuda.synchronize()
        ref_att, ref_o = step(raw.clone(), False, True)  # stores the same k and v again
        torch.cuda.synchronize()
        ok = torch.equal(att, ref_att) and torch.equal(o, ref_o)
        verdict(f"decode attention releasing the o GEMV, {rows} rows splits={splits}, replay {i} {dtype}", ok)


def bench_decode_rope(batch: int) -> list[str]:
    """A decode step's attention with the q/k norm, RoPE and store inside against the two launches,
    bf16, Qwen3-0.6B's heads, contexts up to 2048 (CUDA graphs, L2 not flushed)."""
    sms = tb.device_num_sms(torch.device(DEV))
    qkv, c, rope = decode_rope_case(batch, 2048, torch.bfloat16, torch.bfloat16)
    splits = tb.choose_num_splits(batch, 8, 2048, sms)
    fused_us = graph_us(lambda: decode_rope_paths(qkv, c, rope, splits, fused_rope=True))
    separate_us = graph_us(lambda: decode_rope_paths(qkv, c, rope, splits, fused_rope=False))
    label = f"decode + rope b={batch} (separate {separate_us:.1f} µs)"
    return [f"{label:<40} {fused_us:>9.1f} µs"]


def bench_fused_store(rows: int) -> list[str]:
    """qk_norm_rope with the cache store against the kernel plus store_kvcache, bf16, Qwen3-0.6B's
    heads, `rows` decode tokens at ctx 1024: the launch the fused store saves in every layer."""
    dtype, heads = torch.bfloat16, QWEN3["heads"]
    c = make_case([1024] * rows, [1] * rows, dtype, fill=False)
    p = layer_parts(dtype)
    qkv = torch.randn(rows, (heads[0] + 2 * heads[1]) * QWEN3["head_dim"], dtype=dtype, device=DEV)
    positions = torch.full((rows,), 1023, device=DEV)
    kv = (c.k_cache, c.v_cache, c.meta.slot_mapping)
    args = (p.rotary.cos, p.rotary.sin, p.q_norm.weight, p.k_norm.weight, *heads, EPS)
    us = graph_us(lambda: fused.qk_norm_rope(qkv, positions, *args, kv))
    separate_us = graph_us(lambda: separate_store(qkv, positions, c, p, heads))
    label = f"qk_norm_rope + store T={rows} (separate {separate_us:.1f} µs)"
    return [f"{label:<40} {us:>9.1f} µs"]


def graph_us(fn: Callable[[], object]) -> float:
    """Median µs of one CUDA-graph replay of fn (L2 flushed before each by do_bench), so the torch
    paths' many launches are timed without their host launch gaps, as a captured decode step runs."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3


def bench_fused(rows: int) -> list[str]:
    """Each fused kernel against the torch path it replaces, bf16, Qwen3-0.6B's layer, `rows` tokens."""
    dtype, p, heads, d = torch.bfloat16, layer_parts(torch.bfloat16), QWEN3["heads"], QWEN3["head_dim"]
    x, residual = torch.randn(rows, HIDDEN, dtype=dtype, device=DEV), torch.randn(rows, HIDDEN, dtype=dtype, device=DEV)
    qkv = torch.randn(rows, (heads[0] + 2 * heads[1]) * d, dtype=dtype, device=DEV)
    positions = torch.randint(0, 4096, (rows,), device=DEV)
    g = torch.randn(rows, 2 * MLP, dtype=dtype, device=DEV)
    qk_bytes = 2 * rows * (heads[0] + heads[1]) * d * 2  # q and k read and written
    cases = [
        ("add_rms_norm", 4 * x.numel() * 2,
         lambda: fused.add_rms_norm(x, residual, p.norm.weight, EPS), lambda: p.norm.add_norm_torch(x, residual)),
        ("qk_norm_rope", qk_bytes,
         lambda: qk_norm_rope_fused(qkv, positions, p, heads),
         lambda: qk_norm_rope_torch(qkv, positions, p, heads)),
        ("silu_and_mul", 3 * rows * MLP * 2, lambda: fused.silu_and_mul(g), lambda: SiluAndMul().forward_torch(g)),
    ]  # fmt: skip
    rows_out = []
    for name, nbytes, fused_fn, torch_fn in cases:
        us, torch_us = graph_us(fused_fn), graph_us(torch_fn)
        label = f"{name} T={rows} (torch path {torch_us:.1f} µs)"
        rows_out.append(f"{label:<40} {us:>9.1f} µs  {nbytes / (us * 1e-6) / 1e9:>8.0f} GB/s")
    return rows_out


VOCAB = 151936  # Qwen3's


def verdict(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name:<64} {detail}")
    if not ok:
        FAILURES.append(name)


def check_sampling(dtype: torch.dtype) -> None:
    """Greedy rows are torch.argmax (first of ties, past masks); T = 0.6 rows never draw a masked
    entry and draw the same token whatever the split of the row and whatever else is in the batch."""
    for batch in (1, 7, 256, 512):
        x = (4 * torch.randn(batch, VOCAB, device=DEV)).to(dtype)
        x[:, random.randrange(97) :: 97] = float("-inf")
        x[0, [VOCAB - 5, 4099, 77]] = x[0].max() + 1  # a three-way tie for the best entry
        seeds = torch.randint(0, 2**62, (batch,), device=DEV)
        greedy = sk.sample_tokens(x, torch.zeros(batch, device=DEV), seeds)
        ok = torch.equal(greedy, x.argmax(-1)) and greedy[0].item() == 77
        verdict(f"sampling greedy == argmax b={batch} {dtype}", ok)
        temps = torch.full((batch,), 0.6, device=DEV)
        drawn = sk.sample_tokens(x, temps, seeds)
        same = all(torch.equal(drawn, sk.sample_tokens(x, temps, seeds, num_splits=n)) for n in (1, 5, 64))
        alone = sk.sample_tokens(x[-1:], temps[-1:], seeds[-1:])
        live = bool(x[torch.arange(batch, device=DEV), drawn].isfinite().all())
        ok = same and live and torch.equal(alone, drawn[-1:])
        verdict(f"sampling T=0.6 split/batch-independent, unmasked b={batch} {dtype}", ok)


def check_sampling_distribution() -> None:
    """Draws vs softmax(logits / T): 8 live entries spread over the vocab (chunks, lanes and Philox
    words differ); and a token of probability 4.5e-5 in 2^22 two-entry rows, which wins only on
    large noise (above ~5), where the noise comes from its series branch and lg2.approx."""
    live = torch.tensor([3, 1000, 2049, 40000, 75001, 100002, VOCAB - 2, VOCAB - 1], device=DEV)
    probs = torch.tensor([0.02, 0.05, 0.08, 0.1, 0.15, 0.18, 0.2, 0.22], device=DEV)
    rows, temp = 4096, 0.6
    x = torch.full((rows, VOCAB), float("-inf"), dtype=torch.bfloat16, device=DEV)
    x[:, live] = probs.log().to(torch.bfloat16)
    temps, counts = torch.full((rows,), temp, device=DEV), torch.zeros(8, device=DEV)
    for _ in range(8):
        tokens = sk.sample_tokens(x, temps, torch.randint(0, 2**62, (rows,), device=DEV))
        counts += (tokens[:, None] == live).sum(0)
    expected = (x[0, live].float() / temp).softmax(0) * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 24.32: chi-square at p = 0.001 with 7 degrees of freedom (1 false failure in 1000 runs).
    verdict("sampling distribution, 8 live of 151936, 32768 draws", chi2 < 24.32 and counts.sum() == 8 * rows,
            f"chi2 {chi2:.1f}")  # fmt: skip
    n = 2**22
    pair = torch.tensor([0.0, -10.0], device=DEV).expand(n, 2)
    tail = sk.sample_tokens(pair, torch.ones(n, device=DEV), torch.randint(0, 2**62, (n,), device=DEV))
    hits, want = tail.sum().item(), n * torch.tensor([0.0, -10.0]).softmax(0)[1].item()
    z = (hits - want) / want**0.5
    verdict("sampling tail: p = 4.5e-5 over 2^22 draws", abs(z) < 5, f"{hits} hits, {want:.0f} expected (z {z:+.1f})")


def bench_sampling() -> list[str]:
    """The kernel at T = 0.6 on bf16 logits (CUDA-graph replay, L2 flushed) as µs and logits GB/s,
    per split count; then a whole Sampler.sample call as the worker makes it (eager, host work
    included), on the kernel path and on the torch path it replaces."""
    out = []
    for batch in (1, 256):
        x = torch.randn(batch, VOCAB, dtype=torch.bfloat16, device=DEV)
        temps = torch.full((batch,), 0.6, device=DEV)
        seeds = torch.randint(0, 2**62, (batch,), device=DEV)
        auto = sk.choose_num_splits(batch, VOCAB, tb.device_num_sms(torch.device(DEV)))
        for splits in sorted({auto, 1, 8, 32}):
            sk.sample_tokens(x, temps, seeds, num_splits=splits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sk.sample_tokens(x, temps, seeds, num_splits=splits)
            ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
            label = f"sample kernel b={batch} splits={splits}" + (" (auto)" if splits == auto else "")
            out.append(f"{label:<40} {ms * 1e3:>9.1f} µs  {x.numel() * 2 / (ms * 1e-3) / 1e9:>8.0f} GB/s")
        seqs = [SeqState(i, [0], 1, 1, [], SamplingOptions(temperature=0.6)) for i in range(batch)]
        for kernel in (True, False):
            sampler = Sampler(torch.device(DEV), 0, kernel=kernel)
            ms = triton.testing.do_bench(lambda s=sampler, x=x, seqs=seqs: s.sample(x, seqs), return_mode="median")
            label = f"Sampler.sample b={batch} {'kernel' if kernel else 'torch'} path"
            out.append(f"{label:<40} {ms * 1e3:>9.1f} µs")
    return out


def bench_decode(batch: int, ctx: int, bound: int | None = None, **cfg: int) -> tuple[float, float, int]:
    """Median µs of a CUDA-graph replay (L2 flushed by do_bench before each) and achieved GB/s."""
    c = make_case([ctx] * batch, [1] * batch, torch.bfloat16, bound=bound, fill=False)
    m = c.meta
    sms = tb.device_num_sms(torch.device(DEV))
    splits = tb.choose_num_splits(batch, c.k_cache.shape[2], m.max_seq_len, sms)

    def run() -> torch.Tensor:
        return tb.decode_attention(c.q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, 0.088, splits, **cfg)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    kv_bytes = 2 * batch * ctx * c.k_cache.shape[2] * c.k_cache.shape[3] * c.k_cache.element_size()
    return ms * 1e3, kv_bytes / (ms * 1e-3) / 1e9, splits


def bench_prefill(paged: bool) -> tuple[float, float]:
    lens = [1024] * 8
    c = make_case(lens, lens, torch.bfloat16, fill=False)
    m = c.meta
    k, v = (c.k_cache, c.v_cache) if paged else (c.k, c.v)
    tb.store_kvcache(c.k, c.v, c.k_cache, c.v_cache, m.slot_mapping)
    args = (c.q, k, v, m.block_tables, m.seq_lens, m.query_start_loc, 1024, 0.088)
    ms = triton.testing.do_bench(lambda: tb.prefill_attention(*args, paged=paged), return_mode="median")
    flops = sum(4 * n * (n + 1) / 2 * 16 * 128 for n in lens)  # QK^T + PV over the causal triangle
    return ms * 1e3, flops / (ms * 1e-3) / 1e12


def bench_mixed(plan: str) -> tuple[float, float]:
    """A chunked-prefill step: 255 decode rows at ctx 1024 next to one 512-token chunk, as the backend
    runs it (`decode`: the decode rows in the decode kernel), or all of it in the prefill kernel,
    with (`split`) or without (`one`) the short rows' own launch."""
    ctx, q = [1024] * 255 + [512], [1] * 255 + [512]
    c = make_case(ctx, q, torch.bfloat16, fill=False)
    m = c.meta
    args = (c.q, c.k_cache, c.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, 512, 0.088)
    b = tb.TritonBackend()

    def step() -> None:
        if plan == "decode":
            b.attend(c.q, c.k, c.v, c.k_cache, c.v_cache, m, 0.088)
        else:
            tb.prefill_attention(*args, split_short=plan == "split")

    ms = triton.testing.do_bench(step, return_mode="median")
    kv_bytes = 2 * sum(ctx) * 8 * 128 * 2
    return ms * 1e3, kv_bytes / (ms * 1e-3) / 1e9


def bench_reference_points() -> list[str]:
    x = torch.empty(2**29, dtype=torch.bfloat16, device=DEV)  # 1 GiB
    ms = triton.testing.do_bench(lambda: x.clone(), return_mode="median")
    q = torch.randn(8, 16, 1024, 128, dtype=torch.bfloat16, device=DEV)
    sdpa = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), return_mode="median"
    )
    tflops = 8 * 4 * 1024 * 1025 / 2 * 16 * 128 / (sdpa * 1e-3) / 1e12
    return [
        f"{'torch clone 1 GiB (read+write)':<40} {ms * 1e3:>9.1f} µs  {2 * 2**30 / (ms * 1e-3) / 1e9:>8.0f} GB/s",
        f"{'torch SDPA causal 8x1024 (MHA, dense)':<40} {sdpa * 1e3:>9.1f} µs  {tflops:>8.1f} TFLOP/s",
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--sweep", action="store_true", help="also sweep decode tile/warp/stage configs")
    args = parser.parse_args()
    print(f"seed {args.seed}  {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    for dtype in (torch.bfloat16, torch.float16):
        check_store(dtype)
        check_prefill(dtype)
        check_decode(dtype)
        check_cuda_graph(dtype)
        check_fused(dtype)
        check_fused_cuda_graph(dtype)
        for rows in GEMV_ROWS:
            check_gemv(dtype, rows)
            check_gemv_chain(dtype, rows)
        check_fused_store(dtype)
        check_fused_store_cuda_graph(dtype)
        check_decode_rope(dtype)
        check_decode_release(dtype)
        check_fp8_cache(dtype)
    for dtype in (torch.bfloat16, torch.float32):
        check_sampling(dtype)
    check_sampling_distribution()
    print(f"correctness: {len(FAILURES)} failure(s) in {time.time() - t0:.0f} s")

    rows = []
    for batch, ctx, bound in ((256, 1024, None), (64, 4096, None), (1, 1024, None), (1, 1024, 40960)):
        us, gbs, splits = bench_decode(batch, ctx, bound)
        label = f"decode b={batch} ctx={ctx} splits={splits}" + (f" (bound {bound})" if bound else "")
        rows.append(f"{label:<40} {us:>9.1f} µs  {gbs:>8.0f} GB/s")
    for paged in (True, False):
        us, tflops = bench_prefill(paged)
        label = "prefill 8x1024 " + ("paged" if paged else "flat k/v")
        rows.append(f"{label:<40} {us:>9.1f} µs  {tflops:>8.1f} TFLOP/s")
    for plan in ("decode", "split", "one"):
        us, gbs = bench_mixed(plan)
        rows.append(f"{'mixed 255 dec@1024 + 512 chunk, ' + plan:<40} {us:>9.1f} µs  {gbs:>8.0f} GB/s")
    for tokens in (256, 8192):  # a decode batch; a long prefill step
        rows += bench_fused(tokens)
    for tokens in (1, 256):
        rows += bench_fused_store(tokens)
    for batch in (1, 64, 256):
        rows += bench_decode_rope(batch)
    rows += bench_sampling()
    rows += bench_reference_points()
    if args.sweep:
        for batch, ctx in ((256, 1024), (64, 4096)):
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    for stages in (1, 2, 3, 4):
                        cfg = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
                        try:
                            us, gbs, _ = bench_decode(batch, ctx, **cfg)
                            print(f"sweep b={batch} ctx={ctx} {cfg}: {us:.1f} µs {gbs:.0f} GB/s")
                        except Exception as e:  # e.g. out of shared memory for big tiles x stages
                            print(f"sweep b={batch} ctx={ctx} {cfg}: failed ({type(e).__name__})")
    print("\n" + "\n".join(rows))
    if FAILURES:
        print(f"\nFAILED: {FAILURES}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
