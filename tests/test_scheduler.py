import random
from collections import deque

import pytest

from scheduler_svc.config import CoreConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import FinishReason, SeqStatus, Sequence
from tests.sim_worker import SimWorker, reference, run

EOS = 999


def make(num_blocks: int = 64, block_size: int = 4, **kw: int) -> tuple[Scheduler, SimWorker]:
    cfg = CoreConfig(**{"max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 4096, **kw})
    return Scheduler(cfg, num_blocks, block_size, eos_token_ids={EOS}), SimWorker(block_size)


def add(s: Scheduler, sid: int, prompt: list[int], max_tokens: int, **params: object) -> Sequence:
    seq = Sequence(sid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), len(prompt) + max_tokens)
    s.add(seq)
    return seq


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOS) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def check_all(seqs: list[Sequence], max_tokens: list[int]) -> None:
    for seq, m in zip(seqs, max_tokens, strict=True):
        want = reference(seq.token_ids[: seq.num_prompt_tokens], m, {EOS})
        assert seq.output_ids == want, f"seq {seq.seq_id}"
        assert seq.finish_reason == (FinishReason.STOP if want[-1] == EOS else FinishReason.LENGTH)


@pytest.mark.parametrize("depth", [1, 2])
def test_batch_outputs_match_reference_and_blocks_return(depth: int) -> None:
    s, w = make()
    ps = prompts(12)
    ms = [random.Random(i).randint(1, 30) for i in range(12)]
    seqs = [add(s, i, p, m) for i, (p, m) in enumerate(zip(ps, ms, strict=True))]
    run(s, w, depth=depth)
    check_all(seqs, ms)
    assert s.blocks.num_free == s.num_blocks
    assert all(b.ref_count == 0 for b in s.blocks.blocks)


def test_chunked_prefill_respects_token_budget() -> None:
    s, w = make(max_num_batched_tokens=7)
    seqs = [add(s, i, p, 5) for i, p in enumerate(prompts(4, lo=20, hi=30))]
    while s.has_work():
        batch = s.schedule()
        assert batch is not None and sum(batch.num_tokens) <= 7
        s.postprocess(batch, w.step(batch))
    check_all(seqs, [5] * 4)


def test_prefill_and_decode_share_a_step() -> None:
    s, w = make(max_num_batched_tokens=16)
    add(s, 0, [1, 2, 3], 10)
    b = s.schedule()
    s.postprocess(b, w.step(b))
    add(s, 1, list(range(30)), 3)
    b = s.schedule()
    assert b.num_tokens == [1, 15] and b.samples == [True, False]


def test_max_num_seqs_bounds_running() -> None:
    s, w = make(max_num_seqs=3)
    seqs = [add(s, i, p, 6) for i, p in enumerate(prompts(8))]
    peak = []
    run(s, w, on_step=lambda sc: peak.append(len(sc.running)))
    assert max(peak) <= 3
    check_all(seqs, [6] * 8)


@pytest.mark.parametrize("depth", [1, 2])
def test_prefix_cache_hit_skips_prefill_and_keeps_outputs(depth: int) -> None:
    s, w = make(block_size=4)
    shared = list(range(100, 120))  # 5 full blocks
    first = add(s, 0, shared + [1, 2], 4)
    run(s, w, depth=depth)
    second = add(s, 1, shared + [3], 4)
    batch = s.schedule()
    assert second.num_cached_tokens == 20
    assert batch.num_tokens == [1]  # only the uncached token is computed
    s.postprocess(batch, w.step(batch))
    run(s, w, depth=depth)
    check_all([first, second], [4, 4])
    assert s.blocks.num_hits == 5


def test_preemption_resumes_with_unchanged_output() -> None:
    # 12 blocks of 4 tokens cannot hold 4 sequences growing to 40 tokens at once.
    s, w = make(num_blocks=12, block_size=4)
    ps = prompts(4, seed=3, lo=8, hi=12)
    seqs = [add(s, i, p, 28) for i, p in enumerate(ps)]
    run(s, w, depth=2)
    assert s.num_preemptions > 0
    check_all(seqs, [28] * 4)
    assert s.blocks.num_free == 12


def test_abort_frees_blocks_at_once() -> None:
    s, w = make(num_blocks=32)
    a = add(s, 0, list(range(20)), 50)
    b = add(s, 1, list(range(30, 35)), 50)
    batch = s.schedule()
    s.postprocess(batch, w.step(batch))
    used = s.num_blocks - s.blocks.num_free
    assert used > 0
    s.finish(a, FinishReason.ABORT)
    assert a.status is SeqStatus.FINISHED and a.block_table == []
    assert s.blocks.num_free == s.num_blocks - len(b.block_table)
    assert s.removed == [0]  # the worker is told with the next step
    nxt = s.schedule()
    assert nxt.removed == [0] and a not in nxt.seqs
    s.finish(b, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)  # idempotent
    assert s.blocks.num_free == s.num_blocks


def test_abort_waiting_sequence() -> None:
    s, _ = make()
    a = add(s, 0, [1, 2, 3], 4)
    s.finish(a, FinishReason.ABORT)
    assert not s.has_work() and s.schedule() is None


def test_stop_token_and_min_tokens() -> None:
    s, w = make()
    p = [5, 6, 7]
    ref = reference(p, 20)
    stop_at = ref[3]
    a = add(s, 0, p, 20, stop_token_ids=(stop_at,))
    run(s, w)
    assert a.output_ids == ref[: ref.index(stop_at) + 1] and a.finish_reason is FinishReason.STOP


def test_inflight_token_of_finished_sequence_is_dropped() -> None:
    s, w = make()
    p = [5, 6, 7]
    ref = reference(p, 20)
    a = add(s, 0, p, 20, stop_token_ids=(ref[2],))
    b1 = s.schedule()
    r1 = w.step(b1)
    b2 = s.schedule()  # scheduled before step 1 returns
    r2 = w.step(b2)
    b3 = s.schedule()
    s.postprocess(b1, r1)
    r3 = w.step(b3)
    s.postprocess(b2, r2)
    assert a.output_ids == ref[:2]
    b4 = s.schedule()
    s.postprocess(b3, r3)  # samples ref[2], the stop token
    assert a.is_finished and a.output_ids == ref[:3]
    s.postprocess(b4, w.step(b4))  # its extra token is ignored
    assert a.output_ids == ref[:3]
    assert s.blocks.num_free == s.num_blocks


def test_length_never_overshoots_with_steps_in_flight() -> None:
    s, w = make()
    a = add(s, 0, [1, 2], 3)
    run(s, w, depth=2)
    assert len(a.output_ids) == 3 and a.finish_reason is FinishReason.LENGTH


def test_randomised_mixed_workload_against_reference() -> None:
    rng = random.Random(7)
    s, w = make(num_blocks=40, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    base = [rng.randrange(EOS) for _ in range(16)]
    seqs, ms = [], []
    for i in range(30):
        p = base[: rng.choice([0, 4, 8, 16])] + [rng.randrange(EOS) for _ in range(rng.randint(1, 20))]
        m = rng.randint(1, 40)
        seqs.append(add(s, i, p, m))
        ms.append(m)
    run(s, w, depth=2)
    check_all(seqs, ms)
    assert s.blocks.num_free == 40 and s.blocks.num_hits > 0


class FakeGrammar:
    """Allows every token and completes after `length` of them."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.accepted: list[int] = []

    def accept(self, token_id: int) -> FinishReason | None:
        self.accepted.append(token_id)
        return FinishReason.STOP if len(self.accepted) == self.length else None


def test_constrained_sequences_run_every_step_and_end_when_their_grammar_completes() -> None:
    s, w = make()
    plain = [add(s, i, p, 20) for i, p in enumerate(prompts(3))]
    constrained = [add(s, 10 + i, p, 20) for i, p in enumerate(prompts(2, seed=1))]
    for seq, length in zip(constrained, (5, 8), strict=True):
        seq.grammar = FakeGrammar(length)
    inflight: deque = deque()
    most = dict.fromkeys(range(13), 0)
    while s.has_work() or inflight:
        while len(inflight) < 3 and (batch := s.schedule()) is not None:
            for seq in plain + constrained:
                most[seq.seq_id] = max(most[seq.seq_id], seq.num_inflight)
            inflight.append((batch, w.step(batch)))
        batch, sampled = inflight.popleft()
        s.postprocess(batch, sampled)
    assert all(most[seq.seq_id] == 3 for seq in plain + constrained)  # every one overlaps three steps
    check_all(plain, [20] * 3)
    for seq, length in zip(constrained, (5, 8), strict=True):
        assert seq.output_ids == reference(seq.token_ids[: seq.num_prompt_tokens], length, {EOS})[:length]
        assert seq.grammar.accepted == seq.output_ids and seq.finish_reason is FinishReason.STOP


def add_samples(s: Scheduler, prompt: list[int], n: int, max_tokens: int) -> list[Sequence]:
    """A request's n samples as the core adds them: each after the first led by the first."""
    seqs = [add(s, 100 + i, prompt, max_tokens) for i in range(n)]
    for seq in seqs[1:]:
        seq.leader = seqs[0]
    return seqs


def test_samples_wait_for_the_leaders_prompt_blocks_and_share_them() -> None:
    s, w = make()
    prompt = prompts(1, lo=13, hi=13)[0]  # three full blocks of 4 and one token
    seqs = add_samples(s, prompt, 3, 5)
    first = s.schedule()
    assert first is not None and first.seqs == [seqs[0]]  # the others wait for its prompt to be cached
    first_out = w.step(first)
    ahead = s.schedule()  # the leader's next token, sent before its first is back: the others still wait
    assert ahead is not None and ahead.seqs == [seqs[0]]
    ahead_out = w.step(ahead)
    s.postprocess(first, first_out)
    s.postprocess(ahead, ahead_out)
    run(s, w)
    assert [q.num_cached_tokens for q in seqs] == [0, 12, 12]
    assert (s.blocks.num_queries, s.blocks.num_hits) == (9, 6)
    check_all(seqs, [5, 5, 5])
    assert s.blocks.num_free == s.num_blocks


def test_samples_do_not_wait_without_prefix_caching_or_for_a_finished_leader() -> None:
    s, _ = make(enable_prefix_caching=False)
    seqs = add_samples(s, prompts(1, lo=13, hi=13)[0], 2, 5)
    batch = s.schedule()
    assert batch is not None and batch.seqs == seqs
    s, _ = make()
    seqs = add_samples(s, prompts(1, lo=13, hi=13)[0], 2, 5)
    s.finish(seqs[0], FinishReason.ABORT)  # aborted before its prefill
    batch = s.schedule()
    assert batch is not None and batch.seqs == [seqs[1]] and seqs[1].leader is None


def test_reset_after_a_lost_worker_recomputes_with_unchanged_output_and_no_stale_prefix() -> None:
    """A worker lost mid-run: steps in flight are dropped, every running sequence is recomputed on a
    fresh worker (empty cache: a prefix hit on a block of the old one would read garbage and fail)."""
    s, w = make(num_blocks=64, block_size=4)
    common = list(range(100, 112))  # three full blocks every prompt shares: prefix hits before the loss
    ps = [common + p for p in prompts(10, seed=3, hi=12)]
    seqs = [add(s, i, p, 20) for i, p in enumerate(ps[:3])]
    inflight = []
    for step in range(8):
        if step == 3:  # the first ones' prompt blocks are cached by now
            seqs += [add(s, i, p, 20) for i, p in enumerate(ps[3:6], start=3)]
        while len(inflight) < 2 and (batch := s.schedule()) is not None:
            inflight.append((batch, w.step(batch)))
        batch, sampled = inflight.pop(0)
        s.postprocess(batch, sampled)
    assert s.blocks.num_hits > 0 and s.running
    streamed = {seq.seq_id: list(seq.token_ids) for seq in seqs}
    resumed = s.reset()  # the steps still in flight never return
    assert {q.seq_id for q in resumed} == {q.seq_id for q in seqs if not q.is_finished}
    assert not s.running and s.blocks.num_free == 64 and not s.blocks.cached and not s.removed
    seqs += [add(s, i, p, 20) for i, p in enumerate(ps[6:], start=6)]
    run(s, SimWorker(4))
    check_all(seqs, [20] * len(seqs))
    for seq in seqs[:6]:  # what was known before the loss is kept: nothing streamed twice
        assert seq.token_ids[: len(streamed[seq.seq_id])] == streamed[seq.seq_id]
    assert s.blocks.num_free == 64
