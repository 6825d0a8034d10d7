"""The engine core's recovery against simulated workers, step by step: a worker lost at any point
of the step loop (a step just sent, a result just received) costs no token and repeats none."""

from __future__ import annotations

import asyncio
from unittest.mock import patch

import pytest

from proto import worker_pb2 as wpb
from scheduler_svc.config import CoreConfig
from scheduler_svc.core import EngineCore
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.kv_events import CacheCleared, KvLog
from scheduler_svc.messages import Add, Event, StepOutputs, WorkersBack, WorkersLost
from scheduler_svc.sampling_params import SamplingParams
from tests.sim_worker import VOCAB, next_token, reference

NUM_BLOCKS = 64


class SimGroup:
    """The WorkerGroup interface over a worker that follows the step protocol in protobufs (its next
    token a function of the context, as sim_worker's) and dies at its `fail_at`-th send."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.sends = 0
        self.seqs: dict[int, tuple[list[int], list[int]]] = {}  # seq id -> (tokens, [computed])
        self.results: list[wpb.StepResult] = []

    async def connect(self, timeout: float | None) -> wpb.WorkerInfo:
        return wpb.WorkerInfo(
            rank=0, world_size=1, num_kv_blocks=NUM_BLOCKS, block_size=4, max_model_len=512, vocab_size=VOCAB,
            max_num_seqs=8, max_num_batched_tokens=64, ready=True,
        )  # fmt: skip

    async def send(self, req: wpb.StepRequest) -> None:
        self.sends += 1
        if self.fail_at is not None and self.sends >= self.fail_at:
            raise WorkerUnavailable("simulated worker died")
        for sid in req.removed:
            self.seqs.pop(sid, None)
        for a in req.added:
            self.seqs[a.seq_id] = (list(a.token_ids), [a.num_computed_tokens])
        res = wpb.StepResult(step_id=req.step_id)
        for sid, n in zip(req.seq_ids, req.num_tokens, strict=True):
            tokens, computed = self.seqs[sid]
            computed[0] += n
            if computed[0] == len(tokens):
                tokens.append(next_token(tokens))
                res.seq_ids.append(sid)
                res.token_ids.append(tokens[-1])
        self.results.append(res)

    async def receive(self) -> wpb.StepResult:
        await asyncio.sleep(0)
        return self.results.pop(0)

    async def wait(self, wake: asyncio.Event) -> None:
        await wake.wait()

    async def close(self, graceful: bool = False) -> None:
        return None


class Finishes:
    """An engine core's `emit`: keeps every event, and sets `done` once `expected` sequences have finished."""

    def __init__(self, expected: int) -> None:
        self.events: list[Event] = []
        self.expected, self.finished = expected, 0
        self.done = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, StepOutputs):
            self.finished += sum(reason is not None for _, _, reason, _, _ in event.updates)
            if self.finished == self.expected:
                self.done.set()


def run_core(fail_at: int, adds: list[Add]) -> tuple[EngineCore, list[Event]]:
    """Runs `adds` to their end on a group that dies at its `fail_at`-th send, then on a fresh one."""
    groups = iter([SimGroup(fail_at), SimGroup(None)])
    emit = Finishes(len(adds))

    async def main() -> EngineCore:
        with patch.object(EngineCore, "_group", lambda self: next(groups)):  # each group the core connects
            core = EngineCore(CoreConfig(), ("sim",), frozenset(), emit)
            await core.start()
            for add in adds:
                core.add(add)
            await asyncio.wait_for(emit.done.wait(), 10)
            await core.stop()
        return core

    return asyncio.run(main()), emit.events


def streamed(events: list[Event]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in events:
        if isinstance(e, StepOutputs):
            for sid, token, *_ in e.updates:
                out.setdefault(sid, []).append(token)
    return out


@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 8, 13, 17])
def test_a_worker_lost_at_any_send_costs_no_token_and_repeats_none(fail_at: int) -> None:
    prompts = [[(7 * i + j) % VOCAB for j in range(3 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    core, events = run_core(fail_at, [Add(i, p, params) for i, p in enumerate(prompts)])
    assert streamed(events) == {i: reference(p, 20) for i, p in enumerate(prompts)}
    assert [type(e) for e in events if isinstance(e, WorkersLost | WorkersBack)] == [WorkersLost, WorkersBack]
    assert core.scheduler is not None and core.scheduler.blocks.num_free == NUM_BLOCKS


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 6, 9, 14])
def test_samples_led_by_a_lost_leader_and_the_kv_events_survive_a_reset(fail_at: int) -> None:
    """n samples: the followers wait for the leader's prompt blocks; a loss at any point neither hangs
    them nor repeats a token, and the KV events say the cache was cleared: a mirror built from them
    alone ends equal to the block manager's prefix cache, naming no block of the lost workers."""
    prompts = [[(11 * i + j) % VOCAB for j in range(9 + 2 * i)] for i in range(2)]  # 2+ full blocks of 4
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    adds = []
    for r, p in enumerate(prompts):  # two requests of three samples each
        lead = 10 * r
        adds += [Add(lead + k, p, params, lead if k else None) for k in range(3)]
    core, events = run_core(fail_at, adds)
    assert streamed(events) == {a.seq_id: reference(a.prompt, 12) for a in adds}
    kinds = [type(e) for e in events if not isinstance(e, StepOutputs)]
    assert kinds == [WorkersLost, WorkersBack], kinds
    lost = next(i for i, e in enumerate(events) if isinstance(e, WorkersLost))
    before = events[lost - 1]  # the gauges and the cache's end, sent just before WorkersLost
    assert isinstance(before, StepOutputs) and before.kv == (CacheCleared(),) and before.stats.running == 0
    assert core.scheduler is not None
    kv = KvLog()
    for e in events:
        if isinstance(e, StepOutputs) and e.kv:
            kv.publish(e.kv)
    kv.publish(core.scheduler.blocks.take_events())  # what the idle core had not reported yet
    assert set(kv.live) == set(core.scheduler.blocks.cached) and kv.live
    assert core.scheduler.blocks.num_free == NUM_BLOCKS
