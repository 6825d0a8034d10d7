"""The Triton sampling kernel (worker_svc/sampling_kernel.py), and the Sampler drawing with it, run
by Triton's CPU interpreter: a plain pytest run re-runs this file in a subprocess with
TRITON_INTERPRET=1 (see tests/triton_interpreter.py). Without triton everything skips.

Sizes stay small: the interpreter takes ~10 ms per program and chunk of the vocab. Seeds are fixed,
so the distribution checks cannot flake.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.triton_interpreter import IN_INTERPRETER, fix_interpreter, ptxas_log, require_triton, run_under_interpreter
from worker_svc.sampler import Sampler, report
from worker_svc.seq_state import SamplingOptions, SeqState

require_triton()
needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")

if IN_INTERPRETER:
    fix_interpreter()
    from worker_svc.sampling_kernel import merge_shards, sample_tokens, shard_partials, shard_splits

CPU = torch.device("cpu")
VOCAB = 5000  # three 2048-entry chunks, the last one partial
INF = float("inf")
# Chi-square critical value at p = 0.001 for 6 degrees of freedom.
CHI2_6DF = 22.46


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_sampling_kernel_under_interpreter() -> None:
    run_under_interpreter(__file__)


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="needs the compiling (non-interpreted) kernel")
def test_kernels_compile_for_h100_without_spills_or_shuffles() -> None:
    """The interpreter never lowers to PTX (and accepts code the compiler refuses). Compile for the
    H100 as the runtime would specialise for bf16 logits of a 151,936 vocab: no register spills, and
    no layout conversion between the Philox words and the loaded logits (a shared-memory round trip
    and barriers every chunk)."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker_svc import sampling_kernel as sk

    types = {"logits_ptr": "*bf16", "seed_ptr": "*i64", "out_ptr": "*i64", "part_idx_ptr": "*i32"}
    builds = [
        (sk.sample_kernel, {"FAST": True, "BLOCK": sk.BLOCK}, sk.NUM_WARPS),
        (sk.merge_kernel, {"MAX_SPLITS": 64}, 1),  # its score pointer: *fp32 by the default below
    ]
    for fn, consts, warps in builds:
        names = fn.arg_names
        sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if n in ("stride_row", "vocab") or "*" in sig[n]
        }
        kernel = triton.compile(
            ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
        )
        assert "convert_layout" not in kernel.asm["ttgir"], fn.__name__
        log = ptxas_log(kernel.asm["ptx"])
        assert " 0 bytes spill stores" in log, f"{fn.__name__}: {log}"


def seeds(n: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([rng.getrandbits(63) for _ in range(n)], dtype=torch.int64)


def greedy_case(dtype: torch.dtype) -> torch.Tensor:
    """Strided rows (a view of wider ones) with masks and ties, in `dtype`."""
    wide = (torch.randn(6, VOCAB + 24, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x = wide[:, :VOCAB]
    x[1, x[1].argmax()] = -INF  # the best entry masked: the runner-up wins
    x[2] = -INF
    x[2, -1] = 0  # one live entry, in the partial last chunk
    x[3] = -INF  # nothing live: index 0, as torch.argmax
    x[4] = 0
    x[4, [4196, 2148, 100]] = 5  # equal best in three chunks, at the same lane of each
    x[5, [9, 7]] = 50  # equal best in one chunk
    return x


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_rows_are_argmax(dtype: torch.dtype, splits: int | None) -> None:
    x = greedy_case(dtype)
    tokens = sample_tokens(x, torch.zeros(6), seeds(6), num_splits=splits)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == x.argmax(-1).tolist()
    assert tokens[3:].tolist() == [0, 100, 7]
    out = torch.full((8,), -1, dtype=torch.int64)  # a caller's buffer: the decode graphs' token buffer
    assert sample_tokens(x, torch.zeros(6), seeds(6), num_splits=splits, out=out[:6]).data_ptr() == out.data_ptr()
    assert out.tolist() == tokens.tolist() + [-1, -1]


@needs_interpreter
def test_a_rows_token_depends_only_on_its_logits_temperature_and_seed() -> None:
    x = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    temps = torch.tensor([0.5, 1.0, 2.0, 0.0])
    s = torch.tensor([11, 2**62 + 5, 0, 7])
    batch = sample_tokens(x, temps, s).tolist()
    alone = [sample_tokens(x[i : i + 1], temps[i : i + 1], s[i : i + 1], num_splits=1).item() for i in range(4)]
    flipped = sample_tokens(x.flip(0), temps.flip(0), s.flip(0), num_splits=2).flip(0).tolist()
    assert batch == alone == flipped
    assert batch[3] == x[3].argmax().item()


def sharded(x: torch.Tensor, temps: torch.Tensor, s: torch.Tensor, ranks: int) -> list[int]:
    """Tokens drawn from x split over `ranks` vocabulary shards of equal width (multiples of 4, the
    last padded with junk that must not win), as the tensor-parallel ranks draw them."""
    width = -(-x.size(1) // ranks // 4) * 4
    padded = torch.full((x.size(0), width * ranks), 1e4, dtype=x.dtype)  # junk beats every real logit
    padded[:, : x.size(1)] = x
    splits = shard_splits(padded[:, :width], ranks)
    parts = []
    for r in range(ranks):
        start = r * width
        vocab = min(width, x.size(1) - start)
        parts.append(shard_partials(padded[:, start : start + width], temps, s, start, vocab, splits))
        assert parts[-1].numel() % 8 == 0  # the indices start 16-byte aligned, whatever the rows
    return merge_shards(torch.stack(parts), x.size(0), splits).tolist()


@needs_interpreter
@pytest.mark.parametrize("ranks", [2, 3])
def test_vocabulary_shards_draw_the_whole_rows_tokens(ranks: int) -> None:
    """Each shard scans its slice with the whole vocabulary's noise and indices, so merging the
    shards' winners gives exactly the token of the unsplit row: greedy (masks, ties across shards,
    all -inf), and tempered."""
    x = greedy_case(torch.bfloat16)
    assert sharded(x, torch.zeros(6), seeds(6), ranks) == x.argmax(-1).tolist()
    y = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(10))
    temps, s = torch.tensor([0.6, 1.0, 2.0, 0.0, 0.3, 5.0, 1.2, 0.9]), seeds(8, seed=11)
    whole = sample_tokens(y, temps, s).tolist()
    assert sharded(y, temps, s, ranks) == whole
    assert len(set(whole)) > 4  # the noise matters: not a disguised argmax


@needs_interpreter
def test_noise_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry v's noise is word v % 4 of Philox(seed, v // 4) at any BLOCK: retuning it keeps the
    seeded draws."""
    from worker_svc import sampling_kernel

    x = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(8))
    temps, s = torch.tensor([0.7, 1.0, 1.5, 3.0]), seeds(4, seed=9)
    tokens = sample_tokens(x, temps, s).tolist()
    monkeypatch.setattr(sampling_kernel, "BLOCK", 512)
    assert sample_tokens(x, temps, s).tolist() == tokens


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_draw_as_their_float32_values(dtype: torch.dtype) -> None:
    x = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2)).to(dtype)
    temps, s = torch.tensor([0.6, 1.3, 0.0]), seeds(3)
    assert sample_tokens(x, temps, s).tolist() == sample_tokens(x.float(), temps, s).tolist()


@needs_interpreter
def test_different_seeds_draw_different_tokens() -> None:
    x = torch.zeros(40, 1000)
    tokens = sample_tokens(x, torch.ones(40), seeds(40)).tolist()
    assert len(set(tokens)) >= 35  # uniform over 1000: ~0.8 repeats expected


@needs_interpreter
def test_draws_follow_softmax_at_their_temperature() -> None:
    probs = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log()
    logits[2] = -INF  # masked: never drawn, the rest renormalised
    temps = torch.tensor([0.7] * 1000 + [2.0] * 1000)
    tokens = sample_tokens(logits.expand(2000, 8), temps, seeds(2000, seed=3))
    for half, t in ((tokens[:1000], 0.7), (tokens[1000:], 2.0)):
        counts = torch.bincount(half, minlength=8).double()
        assert counts[2] == 0
        expected = (logits.double() / t).softmax(0) * 1000
        live = expected > 0
        chi2 = ((counts[live] - expected[live]) ** 2 / expected[live]).sum().item()
        assert chi2 < CHI2_6DF, (t, counts.tolist(), expected.tolist())


@needs_interpreter
def test_masked_entries_never_win() -> None:
    x = torch.randn(34, 3000, generator=torch.Generator().manual_seed(4))
    x[:32, ::2] = -INF
    temps = torch.full((34,), 100.0)  # close to uniform over the live entries
    x[32] = -INF
    x[32, -1] = -1e30  # the only live entry, very unlikely-looking
    x[33] = 0
    x[33, 1234] = 1
    temps[33] = 1e-38  # below the kernel's floor: as greedy, and no 0 * inf
    tokens = sample_tokens(x, temps, seeds(34, seed=5)).tolist()
    assert all(t % 2 == 1 for t in tokens[:32])
    assert tokens[32:] == [2999, 1234]


def seq(opts: SamplingOptions, prompt: tuple[int, ...] = (0,), out: tuple[int, ...] = ()) -> SeqState:
    tokens = [*prompt, *out]
    return SeqState(0, tokens, len(prompt), len(tokens), [], opts)


def draw(sampler: Sampler, logits: torch.Tensor, seqs: list[SeqState]) -> list[int]:
    tokens, logprobs = sampler.sample(logits, seqs)
    return [s.token_id for s in report(seqs, tokens.tolist(), logprobs)]


@needs_interpreter
def test_sampler_seeded_token_ignores_the_rest_of_the_batch() -> None:
    """The same token alone, next to plain rows (the one-pass path) and next to rows that need
    penalties or top-k (the torch-filtered path), in any position, at any worker seed."""
    gen = torch.Generator().manual_seed(6)
    mine, others = torch.randn(1, 600, generator=gen), torch.randn(3, 600, generator=gen)
    drawn = set()
    for seed in range(6):
        me = seq(SamplingOptions(seed=seed, temperature=0.8), out=(1, 2, 3))
        plain = [seq(SamplingOptions(seed=5)), seq(SamplingOptions())]
        filtered = [seq(SamplingOptions(top_k=5)), seq(SamplingOptions(repetition_penalty=1.3)), seq(SamplingOptions())]
        alone = draw(Sampler(CPU, 0, kernel=True), mine, [me])[0]
        fast = draw(Sampler(CPU, 1, kernel=True), torch.cat([mine, others[:2]]), [me, *plain])[0]
        slow = draw(Sampler(CPU, 2, kernel=True), torch.cat([others, mine]), [*filtered, me])[3]
        assert alone == fast == slow
        drawn.add(alone)
    assert len(drawn) > 2  # the seed matters


@needs_interpreter
def test_sampler_settings_on_the_kernel_path() -> None:
    logits = torch.randn(6, 600, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    order = logits.float().argsort(-1, descending=True)
    best, second = order[:, 0].tolist(), order[:, 1].tolist()
    banned = SamplingOptions(temperature=0, min_tokens=2, min_tokens_banned_ids=[best[2]])
    biased = SamplingOptions(temperature=0, logit_bias_ids=[int(order[5, 300])], logit_bias_values=[100.0])
    seqs = [
        seq(SamplingOptions(temperature=0, logprobs=3)),
        seq(SamplingOptions(top_k=1)),
        seq(banned, out=(9,)),  # one output of the two min_tokens: its best token is banned
        seq(SamplingOptions(top_k=2, temperature=5.0)),
        seq(SamplingOptions(top_p=1e-6)),
        seq(biased),  # a token from the middle of the row, pushed to the top
    ]
    tokens, logprobs = Sampler(CPU, 0, kernel=True).sample(logits, seqs)
    got = report(seqs, tokens.tolist(), logprobs)
    assert [s.token_id for s in got[:3]] == [best[0], best[1], second[2]]
    assert got[3].token_id in (best[3], second[3])
    assert got[4].token_id == best[4]
    assert got[5].token_id == order[5, 300]
    raw = logits[0].float().log_softmax(-1)  # logprobs from the raw logits, in float32
    assert got[0].logprob == pytest.approx(raw[best[0]].item())
    assert got[0].top_ids == order[0, :3].tolist()


@needs_interpreter
def test_sampler_unseeded_rows_draw_fresh_noise_from_the_worker_seed() -> None:
    """An unseeded row's noise follows from the worker seed, the seq's id and its output index: a
    fresh draw each step and for each seq, and the same on every tensor-parallel rank (their
    Samplers share nothing but the seed)."""
    logits = torch.zeros(1, 1000)

    def unseeded(seq_id: int, outputs: int) -> SeqState:
        return SeqState(seq_id, [0] * (1 + outputs), 1, 1 + outputs, [], SamplingOptions())

    def runs(worker_seed: int) -> list[int]:
        sampler = Sampler(CPU, worker_seed, kernel=True)
        return [draw(sampler, logits, [unseeded(i // 4, i % 4)])[0] for i in range(8)]

    first = runs(7)
    assert len(set(first)) >= 6  # two seqs, four steps each: fresh noise every time
    assert runs(7) == first != runs(8)  # reproducible for a worker seed
