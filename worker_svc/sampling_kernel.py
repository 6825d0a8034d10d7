"""One pass over the logits per sampled token: the Gumbel-max trick in a Triton kernel.

Row r's token is argmax_v(logit_v / T_r + g_v) with g_v standard Gumbel noise, which picks v with
probability softmax(logit / T)_v (the law of the exponential race in sampler.py) without
materialising probabilities. Vocab entry v's noise is word v % 4 of Philox(seed_r, counter v // 4):
a function of the row's seed and v only, so a row's token depends on nothing but its own logits,
temperature and seed, whatever the block size or the split of the row over programs. T = 0 rows
skip the noise: plain argmax. Ties go to the lowest index, as in torch.argmax.

Imports triton: load it only where a GPU (or the interpreter) will run it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Vocab entries per loop step and warps per program: 16 per thread, two 16-byte loads of bf16
# (72 registers on sm_90, so several programs share an SM and hide each other's load latency).
BLOCK = 2048
NUM_WARPS = 4
MAX_SPLITS = 64  # partials per row that merge_kernel reads as one block
NO_INDEX = tl.constexpr(2**31 - 1)  # above every vocabulary index: min() over ties never picks it
LOG2E = tl.constexpr(1.4426950408889634)
MIN_TEMPERATURE = tl.constexpr(1e-30)  # keeps log2(e) / T finite: a 0 logit never makes 0 * inf = NaN


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter runs on CPU tensors: split as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(rows: int, vocab: int, num_sms: int) -> int:
    """Programs per row, for ~4 programs per SM: at batch 1 a single program would stream the whole
    row (300 KB of bf16 at vocab 151,936) through one SM; past 2 rows per SM, one program per row."""
    chunks = triton.cdiv(vocab, BLOCK)
    return max(1, min(chunks, MAX_SPLITS, 4 * num_sms // max(rows, 1)))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """tl.log2 lowers to libdevice's exact log2f, which doubles the kernel's instruction count;
    lg2.approx's ~1e-7 error is far below anything sampling can show. The interpreter has no
    libdevice, hence the switch."""
    return libdevice.fast_log2f(x) if FAST else tl.log2(x)


@triton.jit
def _gumbel_log2(bits, FAST: tl.constexpr):
    """Gumbel noise in log2 units, up to a constant: -log2(E) for E ~ Exp(1), from 32 random bits.

    E = -ln(1 - s) with s = (bits + 0.5) / 2^32, uniform in (0, 1). Small s (the large-noise tail,
    where unlikely tokens win) takes the series s + s^2/2 + s^3/3, since 1 - s would round its bits
    away; the floor on 1 - s covers s rounded up to 1. E stays in [2^-33, 17.4]: the noise is finite,
    so it can neither beat a -inf logit nor cancel one into NaN."""
    s = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
    tail = s * (1.0 + s * (0.5 + s * 0.3333333333333333)) * LOG2E
    e = tl.where(s < 0.0078125, tail, -_log2(tl.maximum(1.0 - s, 2.9802322387695312e-08), FAST))  # E * log2(e)
    return -_log2(e, FAST)


@triton.jit
def _scan(
    row_ptr, vocab, offset, first, last, scale, seed, NOISE: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr
):
    """Per-lane (best score, its vocab index) over chunks [first, last) of BLOCK entries; each lane
    sees rising indices, so `>` keeps the first of equal scores. The row holds vocab entries
    [offset, offset + vocab) of the whole vocabulary (offset a multiple of 4), and the noise and
    the indices are those of the whole vocabulary: a shard draws what the whole row would."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for chunk in range(first, last):
        idx = chunk * BLOCK + lanes
        x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        if NOISE:
            # One Philox call per 4 entries (it yields four words; its 10 rounds would otherwise
            # dominate the kernel). Interleaving the words keeps every value in the load's register
            # layout: no shared-memory shuffles.
            counters = offset // 4 + chunk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            b0, b1, b2, b3 = tl.randint4x(seed, counters)
            bits = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [BLOCK])  # entry 4c + j: word j
            x = x * scale + _gumbel_log2(bits, FAST)
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, offset + idx, best_idx)
    return best, best_idx


@triton.jit
def _first_max(values, indices, fill):
    """(max, lowest index holding it) of a block; all -inf gives index 0, as torch.argmax does."""
    top = tl.max(values, 0)
    return top, tl.min(tl.where(values == top, indices, fill), 0)


@triton.jit(do_not_specialize=["offset", "chunks_per_split", "num_splits", "partial"])
def sample_kernel(
    logits_ptr,
    stride_row,
    vocab,
    offset,
    temperature_ptr,
    seed_ptr,
    out_ptr,
    part_score_ptr,
    part_idx_ptr,
    chunks_per_split,
    num_splits,
    partial,
    FAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (rows, splits): program (r, p) scans chunks [p * chunks_per_split, ...) of row r and
    writes its token, or (`partial`) its partial (score, index) for merge_kernel."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, tl.cdiv(vocab, BLOCK))
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    if temperature > 0:
        # Scores in log2 units, logit * log2(e) / T - log2(E): the argmax of logit / T - ln(E).
        scale = LOG2E / tl.maximum(temperature, MIN_TEMPERATURE)
        seed = tl.load(seed_ptr + row)
        best, best_idx = _scan(row_ptr, vocab, offset, first, last, scale, seed, True, FAST, BLOCK)
    else:
        best, best_idx = _scan(row_ptr, vocab, offset, first, last, 1.0, 0, False, FAST, BLOCK)
    top, token = _first_max(best, best_idx, offset + vocab)
    if partial:  # a runtime branch: one compiled kernel for every batch size
        tl.store(part_score_ptr + row * num_splits + split, top)
        tl.store(part_idx_ptr + row * num_splits + split, token)
    else:
        tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit(do_not_specialize=["num_splits", "num_parts", "part_stride"])
def merge_kernel(part_score_ptr, part_idx_ptr, out_ptr, num_splits, num_parts, part_stride, MAX_SPLITS: tl.constexpr):
    """One program per row picks the best of num_parts blocks of [rows, num_splits] partials,
    part_stride apart (one block per rank of a split vocabulary). The partials cover rising vocab
    ranges in that order, so the lowest index among equal scores is still the row's first."""
    row = tl.program_id(0)
    offs = tl.arange(0, MAX_SPLITS)
    mask = offs < num_parts * num_splits
    at = (offs // num_splits) * part_stride + row * num_splits + offs % num_splits
    scores = tl.load(part_score_ptr + at, mask=mask, other=float("-inf"))
    indices = tl.load(part_idx_ptr + at, mask=mask, other=0)
    _, token = _first_max(scores, indices, NO_INDEX)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids [S] int64 from logits [S, V] (bf16, fp16 or fp32; rows may be strided, the last dim
    must be contiguous), temperature [S] (0: greedy) and int64 seeds [S], written into `out` if given
    (contiguous [S] int64). Launches without waiting.

    num_splits (programs per row) defaults to choose_num_splits; it never changes the tokens."""
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (rows,) and out.dtype == torch.int64 and out.is_contiguous()
    if rows == 0:
        return out
    _check(logits, temperature, seeds)
    splits = _splits(logits, num_splits, MAX_SPLITS)
    if splits == 1:
        _launch(logits, temperature, seeds, out, out, out, vocab, 0, 1, partial=False)  # no partials touched
        return out
    part_score = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _launch(logits, temperature, seeds, out, part_score, part_idx, vocab, 0, splits, partial=True)
    merge_kernel[(rows,)](part_score, part_idx, out, splits, 1, 0, MAX_SPLITS=MAX_SPLITS, num_warps=1)
    return out


def sample_shard(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    offset: int,
    vocab: int,
    ranks: int,
    all_gather: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sample_tokens for a vocabulary split over `ranks` ranks, called on every rank with the same
    temperatures and seeds: this rank's logits [S, W] (W the same on every rank) hold vocabulary
    entries [offset, offset + vocab), vocab <= W. `all_gather` takes a 1-D tensor [n] to [ranks, n]
    in rank order. The ranks swap a few partial winners instead of the logits, and every rank
    returns the tokens sample_tokens would draw from the whole rows."""
    splits = shard_splits(logits, ranks)
    parts = shard_partials(logits, temperature, seeds, offset, vocab, splits)
    return merge_shards(all_gather(parts), logits.size(0), splits)


def shard_splits(logits: torch.Tensor, ranks: int) -> int:
    """Programs per row of a shard: from the rows and W alone, so the same on every rank."""
    return _splits(logits, None, MAX_SPLITS // ranks)


def shard_partials(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, offset: int, vocab: int, splits: int
) -> torch.Tensor:
    """This shard's partial winners as one int32 tensor [2 * m]: the scores' float32 bits from 0,
    their vocabulary indices from m, where m is S * splits rounded up to 4, which starts the
    indices 16-byte aligned: Triton specialises kernels on pointer alignment, and a batch size must
    not pick a new compilation."""
    assert offset % 4 == 0, "a shard starts on a Philox group of 4 entries"
    _check(logits, temperature, seeds)
    rows = logits.size(0)
    n = rows * splits
    m = -(-n // 4) * 4
    parts = torch.empty(2 * m, dtype=torch.int32, device=logits.device)
    if rows:  # `out` is not written with partials
        scores, indices = parts[:n].view(torch.float32), parts[m : m + n]
        _launch(logits, temperature, seeds, parts, scores, indices, vocab, offset, splits, partial=True)
    return parts


def merge_shards(gathered: torch.Tensor, rows: int, splits: int) -> torch.Tensor:
    """Tokens [rows] from every rank's shard_partials, stacked in rank order [ranks, 2 * m]."""
    ranks, m = gathered.size(0), gathered.size(1) // 2
    out = torch.empty(rows, dtype=torch.int64, device=gathered.device)
    if rows:
        merge_kernel[(rows,)](
            gathered.view(torch.float32), gathered.view(-1)[m:], out, splits, ranks, 2 * m,
            MAX_SPLITS=MAX_SPLITS, num_warps=1,
        )  # fmt: skip
    return out


def _check(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> None:
    rows = logits.size(0)
    assert logits.stride(-1) == 1, "the vocab dim must be contiguous"
    assert temperature.shape == (rows,) and seeds.shape == (rows,) and seeds.dtype == torch.int64


def _splits(logits: torch.Tensor, wanted: int | None, most: int) -> int:
    """Programs per row, from the rows and the row width alone."""
    rows, width = logits.shape
    chunks = triton.cdiv(width, BLOCK)
    splits = min(wanted or choose_num_splits(rows, width, _num_sms(logits.device)), chunks, most)
    return triton.cdiv(chunks, triton.cdiv(chunks, splits))  # no program without a chunk of the width


def _launch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    out: torch.Tensor,
    part_score: torch.Tensor,
    part_idx: torch.Tensor,
    vocab: int,
    offset: int,
    splits: int,
    partial: bool,
) -> None:
    """Program p scans chunks [p * per_split, ...) of the row's width; entries past vocab read -inf."""
    per_split = triton.cdiv(triton.cdiv(logits.size(1), BLOCK), splits)
    sample_kernel[(logits.size(0), splits)](
        logits, logits.stride(0), vocab, offset, temperature, seeds, out, part_score, part_idx, per_split, splits,
        int(partial), FAST=_COMPILED, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip


_COMPILED = isinstance(sample_kernel, triton.runtime.JITFunction)  # False under TRITON_INTERPRET=1
