"""Structured output with the real engine core, executor and model runner in one process (the in-process
benchmark's transport): a constrained row runs in every step like any other, its token drawn under the
worker's mask once the step before is read back, so it skips no step and the batch waits for nothing."""

from __future__ import annotations

import asyncio
import re
import time
from unittest.mock import patch

from transformers import AutoTokenizer

from bench.local_worker import LocalWorker
from proto import worker_pb2 as wpb
from scheduler_svc.config import CoreConfig
from scheduler_svc.core import EngineCore
from scheduler_svc.messages import Add, Event, Rejected, StepOutputs
from scheduler_svc.sampling_params import Constraint, SamplingParams
from scheduler_svc.sequence import FinishReason
from tests.test_core_recovery import Finishes
from worker_svc.config import WorkerConfig
from worker_svc.matchers import Matchers

REGEX = "[ab]{12}c"


class Recording(LocalWorker):
    """The in-process worker, keeping every step request the core sends."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.requests: list[wpb.StepRequest] = []

    async def send(self, req: wpb.StepRequest) -> None:
        self.requests.append(req)
        await super().send(req)


def run(
    model_dir: str, eos: int, adds: list[Add], max_inflight_steps: int
) -> tuple[list[wpb.StepRequest], list[Event]]:
    worker = Recording(WorkerConfig(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=64))
    emit = Finishes(len(adds))

    async def main() -> None:
        core = EngineCore(CoreConfig(max_inflight_steps=max_inflight_steps), worker, frozenset({eos}), emit, model_dir)
        await core.start()
        for add in adds:
            core.add(add)
        try:
            await asyncio.wait_for(emit.done.wait(), 120)
        finally:
            await core.stop()

    asyncio.run(main())
    return worker.requests, emit.events


def outputs(events: list[Event]) -> dict[int, tuple[list[int], FinishReason | None]]:
    out: dict[int, tuple[list[int], FinishReason | None]] = {}
    for e in events:
        if isinstance(e, StepOutputs):
            for sid, token, reason, *_ in e.updates:
                tokens, _ = out.get(sid, ([], None))
                out[sid] = (tokens + [token], reason)
    return out


def test_a_constrained_row_samples_in_every_step_and_its_output_matches(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.encode("write a and b")
    constrained = SamplingParams(max_tokens=40, seed=3, constraint=Constraint("regex", REGEX))
    plain = SamplingParams(max_tokens=30, seed=4, ignore_eos=True)
    for depth in (1, 2, 3):
        requests, events = run(
            str(tiny_model_dir), tok.eos_token_id, [Add(0, prompt, constrained), Add(1, prompt, plain)], depth
        )
        got = outputs(events)
        text = tok.decode(got[0][0], skip_special_tokens=True)
        assert re.fullmatch(REGEX, text) and got[0][1] is FinishReason.STOP, (depth, text)
        assert len(got[1][0]) == 30 and got[1][1] is FinishReason.LENGTH
        # The constrained row is in one unbroken run of steps: one per token, plus at most the steps
        # already sent when its grammar completed (their tokens are dropped).
        steps = [i for i, req in enumerate(requests) if 0 in req.seq_ids]
        assert steps == list(range(steps[0], steps[0] + len(steps))), depth
        assert len(got[0][0]) <= len(steps) <= len(got[0][0]) + depth, depth


def test_a_worker_without_grammars_gets_no_constrained_request(tiny_model_dir) -> None:
    with patch.object(Matchers, "load", return_value=None):  # as a worker without xgrammar or a tokenizer
        worker = Recording(WorkerConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64))
    events: list[Event] = []

    async def main() -> None:
        core = EngineCore(CoreConfig(), worker, frozenset({0}), events.append, str(tiny_model_dir))
        await core.start()
        params = SamplingParams(max_tokens=4, constraint=Constraint("regex", REGEX))
        core.add(Add(0, [1, 2, 3], params))
        deadline = time.monotonic() + 10
        while not any(isinstance(e, Rejected) for e in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await core.stop()

    asyncio.run(main())
    rejected = [e for e in events if isinstance(e, Rejected)]
    assert [(e.seq_id, e.why) for e in rejected] == [
        (0, "structured output is off here: its workers lack xgrammar or the tokenizer")
    ]
    assert not worker.requests  # nothing reached the worker
