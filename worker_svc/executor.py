"""Runs a stream of steps in order, overlapping the host work of step N+1 with the device's step N.

A launched step is read back only when the next one has been launched, or when the device has
finished it and no next step has come: whichever happens first. Waiting for the next step is the
point: the scheduler answers step N's result with step N+2 while the device runs N+1, so N+2 is
launched before N+1 ends and the device never waits for the host. Its decode inputs are the tokens
the device just sampled, which never leave the device. A step's constrained rows are drawn once
the step before it is read back (their masks need its tokens), while the device runs the step.
Transport-agnostic: the gRPC servicer and the in-process benchmark both feed it a queue of
StepRequests and forward the StepResults it yields.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from proto import worker_pb2 as wpb
from worker_svc.model_runner import ModelRunner, Pending
from worker_svc.seq_state import Sampled, SamplingOptions, SeqState

END = None  # put on the queue to end the stream


@dataclass(frozen=True)
class Ready:
    """Put on the request queue when the device has finished launched step `step_id`."""

    step_id: int


class Watcher:
    """Turns launched steps' completion events into Ready items on the request queue, so the
    executor blocks on one queue for whichever comes first: the next step or the device's result."""

    def __init__(self, inbox: queue.Queue) -> None:
        self.inbox = inbox
        self.events: queue.Queue[tuple[int, torch.cuda.Event] | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    def watch(self, step_id: int, pending: Pending) -> None:
        done = pending.done
        if done is None:  # ran synchronously (CPU), or nothing to read back: ready now
            self.inbox.put(Ready(step_id))
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._wait, name="step-watcher", daemon=True)
            self.thread.start()
        self.events.put((step_id, done))

    def close(self) -> None:
        if self.thread is not None:
            self.events.put(None)
            self.thread.join()

    def _wait(self) -> None:
        # Events complete in launch order, so waiting on them one by one loses nothing; the wait
        # releases the GIL.
        while (item := self.events.get()) is not None:
            item[1].synchronize()
            self.inbox.put(Ready(item[0]))


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
            logit_bias_ids=list(s.logit_bias_ids),
            logit_bias_values=list(s.logit_bias_values),
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

    def run(self, requests: queue.Queue[wpb.StepRequest | Ready | None]) -> Iterator[wpb.StepResult]:
        pending: tuple[int, Pending] | None = None
        self.runner.bind_thread()  # the gRPC servicer calls this from one of its own threads
        watcher = Watcher(requests)
        try:
            while (req := requests.get()) is not END:
                if isinstance(req, Ready):
                    # The device is done and no next step came first: hand the result back now.
                    if pending is not None and pending[0] == req.step_id:
                        yield from self._finish(pending)
                        pending = None
                    continue  # else a step already read back on launching the next one
                seqs, counts = self._apply(req)
                if pending is not None and self.runner.needs_history(seqs):
                    yield from self._finish(pending)  # penalties need every token's value on the host
                    pending = None
                handle = self.runner.launch(seqs, counts)
                done = self.runner.collect(pending[1]) if pending is not None else None
                if handle.deferred is not None:
                    # Its constrained rows are drawn now that every token before theirs is on the
                    # host and matched, while the device runs the step.
                    self.runner.resolve(handle)
                watcher.watch(req.step_id, handle)
                if pending is not None and self.answer:
                    yield to_result(pending[0], done or [])
                pending = (req.step_id, handle)
            if pending is not None:
                yield from self._finish(pending)
        finally:
            watcher.close()
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
            states[msg.seq_id] = seq = to_state(msg)
            if msg.HasField("grammar"):
                if self.runner.matchers is None:
                    raise ValueError("structured output is off on this worker (no xgrammar or tokenizer)")
                self.runner.matchers.start(seq, msg.grammar)
        for seq_id, block_id in zip(req.block_seq_ids, req.block_ids, strict=True):
            states[seq_id].block_table.append(block_id)
        return [states[s] for s in req.seq_ids], list(req.num_tokens)

    def _finish(self, pending: tuple[int, Pending]) -> Iterator[wpb.StepResult]:
        step_id, handle = pending
        samples = self.runner.collect(handle)
        if self.answer:
            yield to_result(step_id, samples)
