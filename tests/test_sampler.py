"""The sampler's stages on hand-made logits: exact values where the spec fixes them, and
distributions checked with a chi-square test at a fixed seed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker_svc.logit_stages import apply_logit_bias, apply_min_p, apply_min_tokens, apply_penalties, apply_top_k_top_p
from worker_svc.sampler import Sampler, report
from worker_svc.seq_state import Sampled, SamplingOptions, SeqState

CPU = torch.device("cpu")
PROBS = [0.1, 0.2, 0.3, 0.4]
# Chi-square critical values at p = 0.001 for 3 degrees of freedom: a correct sampler fails 1 in 1000.
CHI2_3DF = 16.27


def seq(opts: SamplingOptions, prompt: tuple[int, ...] = (0,), out: tuple[int, ...] = (), seq_id: int = 0) -> SeqState:
    tokens = [*prompt, *out]
    return SeqState(seq_id, tokens, len(prompt), len(tokens), [], opts)


def samples(sampler: Sampler, logits: torch.Tensor, seqs: list[SeqState]) -> list[Sampled]:
    tokens, logprobs = sampler.sample(logits, seqs)
    return report(seqs, tokens.tolist(), logprobs)


def sample(logits: torch.Tensor, seqs: list[SeqState], seed: int = 0) -> list[int]:
    return [s.token_id for s in samples(Sampler(CPU, seed), logits, seqs)]


def chi_square(tokens: list[int], probs: list[float]) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()
    n = len(tokens)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [seq(SamplingOptions(temperature=0)) for _ in range(6)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("opts", [SamplingOptions(top_k=1), SamplingOptions(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(opts: SamplingOptions) -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    assert sample(logits, [seq(opts) for _ in range(64)]) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.tensor([PROBS] * 4).log()
    top_k, top_p = torch.tensor([2, 4, 4, 3]), torch.tensor([1.0, 0.65, 0.75, 0.75])
    assert apply_top_k_top_p(logits, top_k, top_p).isfinite().tolist() == [
        [False, False, True, True],  # top-k 2
        [False, False, True, True],  # top-p 0.65: 0.4 + 0.3 reaches it
        [False, True, True, True],  # top-p 0.75 needs 0.4 + 0.3 + 0.2
        [False, False, True, True],  # top-k 3 renormalises first: 0.4/0.9 + 0.3/0.9 reaches 0.75
    ]
    assert apply_top_k_top_p(logits[:3], torch.tensor([4, 4, 4]), torch.tensor([1.0, 0.99, 0.05])).isfinite().sum(
        -1
    ).tolist() == [4, 4, 1]


def test_min_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_min_p(logits, torch.tensor([0.2])).isfinite().tolist() == [[True, True, True, False]]
    tokens = sample(logits.expand(2000, 4), [seq(SamplingOptions(min_p=0.2)) for _ in range(2000)])
    assert 3 not in tokens
    assert chi_square(tokens, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 1e-9]) < CHI2_3DF


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_temperature_sampling_follows_the_distribution(temperature: float) -> None:
    expected = [p ** (1 / temperature) for p in PROBS]
    expected = [p / sum(expected) for p in expected]
    logits = torch.tensor(PROBS).log().expand(4000, 4)
    tokens = sample(logits, [seq(SamplingOptions(temperature=temperature)) for _ in range(4000)])
    assert chi_square(tokens, expected) < CHI2_3DF


def test_seeded_draws_follow_the_distribution() -> None:
    # One seeded seq over its output indices: its draws must be as random as unseeded ones.
    sampler = Sampler(CPU, 0)
    logits = torch.tensor([PROBS]).log()
    opts = SamplingOptions(seed=99)
    tokens = [samples(sampler, logits, [seq(opts, out=(0,) * i)])[0].token_id for i in range(2000)]
    assert chi_square(tokens, PROBS) < CHI2_3DF


def test_seeded_token_does_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    mine = torch.randn(1, 100, generator=gen)
    others = torch.randn(3, 100, generator=gen)
    for seed in range(20):
        me = seq(SamplingOptions(seed=seed), out=(1, 2, 3), seq_id=7)
        rest = [seq(SamplingOptions(seed=5)), seq(SamplingOptions()), seq(SamplingOptions(top_k=5))]
        alone = sample(mine, [me], seed=seed)[0]
        first = sample(torch.cat([mine, others]), [me, *rest], seed=100)[0]
        last = sample(torch.cat([others, mine]), [*rest, me], seed=200)[3]
        assert alone == first == last
    draws = {sample(mine, [seq(SamplingOptions(seed=s))])[0] for s in range(20)}
    assert len(draws) > 3  # the seed matters


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0]])
    opts = SamplingOptions(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # Prompt has tokens 0 and 1; output has 2 twice and 3 once; 4 and 5 never appeared.
    s = seq(opts, prompt=(0, 1), out=(2, 3, 2))
    apply_penalties(logits, [s])
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied
        3.0 / 2 - 0.25 * 2 - 0.5,  # output twice: repetition, frequency x2, presence
        -2.0 * 2 - 0.25 - 0.5,  # output once
        0.5,
        1.0,
    ]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_leave_other_rows_alone() -> None:
    logits = torch.tensor([[2.0, -1.0], [2.0, -1.0]])
    apply_penalties(logits, [seq(SamplingOptions(), prompt=(0, 1)), seq(SamplingOptions(repetition_penalty=2.0))])
    assert logits.tolist() == [[2.0, -1.0], [1.0, -1.0]]


def test_min_tokens_bans_stop_ids_until_enough_outputs() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    opts = SamplingOptions(temperature=0, min_tokens=2, min_tokens_banned_ids=[1, 3])
    masked = logits.clone()
    apply_min_tokens(masked, [seq(opts, out=(2,))])
    assert masked.tolist() == [[0.0, -math.inf, 4.0, -math.inf]]
    assert sample(logits, [seq(opts, out=(2,))]) == [2]
    assert sample(logits, [seq(opts, out=(2, 2))]) == [1]  # min_tokens reached


def test_logit_bias_adds_to_its_own_row_only() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    best = logits.argmax(-1).tolist()
    pushed = SamplingOptions(temperature=0, logit_bias_ids=[7, best[1]], logit_bias_values=[100.0, -100.0])
    banned = SamplingOptions(temperature=0, logit_bias_ids=[best[1]], logit_bias_values=[-100.0])
    rows = [seq(SamplingOptions(temperature=0)), seq(banned), seq(pushed)]
    got = sample(logits, rows)
    assert got[0] == best[0]
    assert got[1] == logits[1].clone().index_fill_(0, torch.tensor([best[1]]), -1e9).argmax().item()
    assert got[2] == 7
    work = logits.clone()
    apply_logit_bias(work, rows)
    assert torch.equal(work[0], logits[0])
    assert work[2, 7] == logits[2, 7] + 100.0 and work[1, best[1]] == logits[1, best[1]] - 100.0


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    opts = SamplingOptions(temperature=0.7, repetition_penalty=1.5, top_k=5, logprobs=4, seed=1)
    seqs = [seq(opts, prompt=(1, 2, 3)), seq(SamplingOptions(logprobs=0))]
    got = samples(Sampler(CPU, 0), logits, seqs)
    raw = logits[0].log_softmax(-1)
    assert got[0].logprob == pytest.approx(raw[got[0].token_id].item())
    assert got[0].top_ids == raw.argsort(descending=True)[:4].tolist()
    assert got[0].top_logprobs == pytest.approx(raw.sort(descending=True).values[:4].tolist())
    assert got[1].logprob is None and got[1].top_ids == []


@pytest.mark.slow
def test_cpu_sampler_needs_no_triton() -> None:
    """A CPU install has no triton: the sampler must import, and sample on the CPU, without it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from worker_svc.sampler import Sampler\n"
        "from worker_svc.seq_state import SamplingOptions, SeqState\n"
        "s = Sampler(torch.device('cpu'), 0)\n"
        "seq = SeqState(0, [0], 1, 1, [], SamplingOptions(seed=1))\n"
        "assert s.kernel is None and s.sample(torch.randn(1, 10).bfloat16(), [seq])[0].shape == (1,)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def test_row_seeds_are_the_seeds_mixed_with_the_output_index() -> None:
    """The vectorised seeds equal _mix(seed, output index) (what the torch path seeds a seeded
    row's generator with), also where the uint64 sums wrap; unseeded rows differ by seq."""
    from worker_svc.sampler import _MASK63, _mix

    seeds = [0, 7, 2**63 + 5, 2**64 - 1]
    seqs = [SeqState(i, [1] * (3 + i), 2, 0, [], SamplingOptions(seed=s)) for i, s in enumerate(seeds)]
    got = Sampler(torch.device("cpu"), 0).row_seeds(seqs).tolist()
    assert got == [_mix(s, q.num_output) & _MASK63 for s, q in zip(seeds, seqs, strict=True)]
    unseeded = [SeqState(i, [1, 2], 1, 0, [], SamplingOptions()) for i in range(3)]
    assert len(set(Sampler(torch.device("cpu"), 0).row_seeds(unseeded).tolist())) == 3
