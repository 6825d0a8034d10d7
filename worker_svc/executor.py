"""Runs a stream of steps in order, overlapping the host work of step N+1 with the device's step N.

The step after a launched one is prepared and launched before the launched one's tokens are read
back, when it has already arrived; its decode inputs are the tokens the device just sampled, which
never leave the device. Transport-agnostic: the gRPC servicer and the in-process benchmark both
feed it a queue of StepRequests and forward the StepResults it yields.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from proto import worker_pb2 as wpb
from worker_svc.model_runner import ModelRunner, Pending
from worker_svc.seq_state import Sampled, SamplingOptions, SeqState

END = None  # put on the queue to end the stream


def to_state(msg: wpb.AddSeq) -> SeqState:
    s = msg.sampling
    return SeqState(
        seq_id=msg.seq_id,
        token_ids=list(msg.token_ids),
        num_prompt_tokens=msg.num_prompt_tokens,
        num_computed=msg.num_computed_tokens,
        block_table=list(msg.block_ids),
        sampling=SamplingOptions(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            seed=s.seed if s.has_seed else None,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_tokens=s.min_tokens,
            min_tokens_banned_ids=list(s.min_tokens_banned_ids),
            logprobs=s.logprobs,
        ),
    )


def to_result(step_id: int, samples: list[Sampled]) -> wpb.StepResult:
    res = wpb.StepResult(step_id=step_id, seq_ids=[s.seq_id for s in samples], token_ids=[s.token_id for s in samples])
    if any(s.logprob is not None for s in samples):
        res.logprobs.extend(
            wpb.SeqLogprobs(logprob=s.logprob or 0.0, top_ids=s.top_ids, top_logprobs=s.top_logprobs) for s in samples
        )
    return res


class Executor:
    def __init__(self, runner: ModelRunner, answer: bool) -> None:
        self.runner = runner
        self.answer = answer  # rank 0 answers; the other ranks only keep in step
        self.states: dict[int, SeqState] = {}

    def run(self, requests: queue.Queue[wpb.StepRequest | None]) -> Iterator[wpb.StepResult]:
        pending: tuple[int, Pending] | None = None
        self.runner.bind_thread()  # the gRPC servicer calls this from one of its own threads
        try:
            while True:
                if pending is None:
                    req = requests.get()
                else:
                    try:
                        req = requests.get_nowait()
                    except queue.Empty:  # nothing to overlap with: hand back what is ready
                        yield from self._finish(pending)
                        pending = None
                        req = requests.get()
                if req is END:
                    break
                seqs, counts = self._apply(req)
                if pending is not None and self.runner.needs_history(seqs):
                    yield from self._finish(pending)  # penalties need every token's value on the host
                    pending = None
                launched = (req.step_id, self.runner.launch(seqs, counts))
                if pending is not None:
                    yield from self._finish(pending)
                pending = launched
            if pending is not None:
                yield from self._finish(pending)
        finally:
            for seq in self.states.values():
                self.runner.release(seq)
            self.states.clear()

    def _apply(self, req: wpb.StepRequest) -> tuple[list[SeqState], list[int]]:
        states = self.states
        for seq_id in req.removed:
            seq = states.pop(seq_id, None)
            if seq is not None:
                self.runner.release(seq)
        for msg in req.added:
            states[msg.seq_id] = to_state(msg)
        for seq_id, block_id in zip(req.block_seq_ids, req.block_ids, strict=True):
            states[seq_id].block_table.append(block_id)
        return [states[s] for s in req.seq_ids], list(req.num_tokens)

    def _finish(self, pending: tuple[int, Pending]) -> Iterator[wpb.StepResult]:
        step_id, handle = pending
        samples = self.runner.collect(handle)
        if self.answer:
            yield to_result(step_id, samples)
