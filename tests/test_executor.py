"""The executor's overlap: a launched step is read back only after the next one is launched, or
once the device is done with it and no next step has come (no deadlock waiting for one)."""

from __future__ import annotations

import queue
import threading

from proto import worker_pb2 as wpb
from worker_svc.executor import END, Executor, Ready
from worker_svc.model_runner import Deferred, Part, Pending
from worker_svc.seq_state import Sampled, SeqState


class FakeDone:
    """A launched step's completion event, set by the test: the device finishes when told."""

    def __init__(self) -> None:
        self.flag = threading.Event()

    def synchronize(self) -> None:
        assert self.flag.wait(timeout=10), "the test never finished this step"


class FakeRunner:
    """Logs launches and read-backs; launch k samples token 100 + k for every seq and finishes on
    the device when the test sets done[k - 1]."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.launched = 0
        self.done: list[FakeDone] = []
        self.matchers = self  # structured output: start() marks a seq constrained

    def start(self, seq: SeqState, grammar: wpb.Grammar) -> None:
        seq.matcher = grammar.kind

    def bind_thread(self) -> None:
        pass

    def needs_history(self, seqs: list[SeqState]) -> bool:
        return False

    def release(self, seq: SeqState) -> None:
        pass

    def launch(self, seqs: list[SeqState], counts: list[int]) -> Pending:
        if not seqs:
            return Pending([])
        self.launched += 1
        self.log.append(f"launch {self.launched}")
        self.done.append(FakeDone())
        now = [s for s in seqs if s.matcher is None]
        later = [s for s in seqs if s.matcher is not None]
        token = [100 + self.launched]
        parts = [Part(now, token * len(now), None)] if now else []  # type: ignore[arg-type]
        pending = Pending(parts, Deferred(later, token, None) if later else None)  # type: ignore[arg-type]
        pending.done = None if later else self.done[-1]  # type: ignore[assignment]
        return pending

    def resolve(self, pending: Pending) -> None:
        assert pending.deferred is not None
        deferred, pending.deferred = pending.deferred, None
        self.log.append(f"resolve {deferred.logits[0] - 100}")
        pending.parts.append(Part(deferred.seqs, deferred.logits * len(deferred.seqs), None))  # type: ignore[arg-type]
        pending.done = self.done[deferred.logits[0] - 101]  # type: ignore[assignment]

    def collect(self, pending: Pending) -> list[Sampled]:
        if not pending.parts:
            return []
        assert pending.deferred is None and pending.done is not None
        self.log.append(f"collect {pending.parts[0].tokens[0] - 100}")
        return [Sampled(s.seq_id, t) for p in pending.parts for s, t in zip(p.seqs, p.tokens, strict=True)]


def step(step_id: int, add: bool = False) -> wpb.StepRequest:
    req = wpb.StepRequest(step_id=step_id, seq_ids=[7], num_tokens=[1])
    if add:
        req.added.append(wpb.AddSeq(seq_id=7, token_ids=[1, 2], num_prompt_tokens=2, block_ids=[0]))
    return req


def test_constrained_rows_are_drawn_once_the_step_before_is_read_back() -> None:
    runner = FakeRunner()
    inbox: queue.Queue = queue.Queue()
    first = step(1, add=True)
    first.added.append(wpb.AddSeq(seq_id=8, token_ids=[1, 2], num_prompt_tokens=2, block_ids=[1]))
    first.added[-1].grammar.kind = "regex"
    first.seq_ids.append(8)
    first.num_tokens.append(1)
    inbox.put(first)
    inbox.put(wpb.StepRequest(step_id=2, seq_ids=[7, 8], num_tokens=[1, 1]))
    thread, results = start(runner, inbox)
    res = results.get(timeout=5)
    assert (res.step_id, sorted(zip(res.seq_ids, res.token_ids, strict=True))) == (1, [(7, 101), (8, 101)])
    inbox.put(END)
    for done in runner.done:
        done.flag.set()
    assert results.get(timeout=5).step_id == 2
    thread.join(timeout=5)
    # Step 1's constrained row is drawn at once (nothing before it); step 2's only after step 1 is read.
    assert runner.log == ["launch 1", "resolve 1", "launch 2", "collect 1", "resolve 2", "collect 2"]


def start(runner: FakeRunner, inbox: queue.Queue) -> tuple[threading.Thread, queue.Queue]:
    results: queue.Queue = queue.Queue()

    def serve() -> None:
        for res in Executor(runner, answer=True).run(inbox):  # type: ignore[arg-type]
            results.put(res)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, results


def test_the_next_step_is_launched_before_the_last_is_read_back() -> None:
    runner = FakeRunner()
    inbox: queue.Queue = queue.Queue()
    inbox.put(step(1, add=True))
    inbox.put(step(2))
    thread, results = start(runner, inbox)
    assert results.get(timeout=5).step_id == 1  # read back once step 2 was launched
    # The scheduler answers step 1's result with step 3 while the device still runs step 2: the
    # executor must wait for it rather than read step 2 back and leave the device idle.
    inbox.put(step(3))
    assert results.get(timeout=5).step_id == 2
    inbox.put(END)
    for done in runner.done:
        done.flag.set()
    assert results.get(timeout=5).step_id == 3
    thread.join(timeout=5)
    assert runner.log == ["launch 1", "launch 2", "collect 1", "launch 3", "collect 2", "collect 3"]


def test_a_finished_step_is_answered_without_waiting_for_the_next() -> None:
    runner = FakeRunner()
    inbox: queue.Queue = queue.Queue()
    inbox.put(step(1, add=True))
    thread, results = start(runner, inbox)
    # The scheduler sends step 2 only after step 1's result: once the device is done, the
    # executor must answer rather than wait for a next step.
    while not runner.done:
        pass
    runner.done[0].flag.set()
    res = results.get(timeout=5)
    assert (res.step_id, list(res.token_ids)) == (1, [101])
    inbox.put(step(2))
    while len(runner.done) < 2:
        pass
    runner.done[1].flag.set()
    assert results.get(timeout=5).step_id == 2
    inbox.put(Ready(1))  # a stale completion notice changes nothing
    inbox.put(END)
    thread.join(timeout=5)
    assert not thread.is_alive() and results.empty()
    assert runner.log == ["launch 1", "collect 1", "launch 2", "collect 2"]
