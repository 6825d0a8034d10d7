"""The engine core: the scheduler and the step loop, knowing token ids only.

It owns the waiting and running queues, the KV block tables and the step streams to the workers.
The frontend (engine.py) owns tokenizing, detokenizing and the clients' streams. They talk with the
messages of messages.py: Add, Finish and Flush go in; Started, StepOutputs, Flushed, WorkersLost,
WorkersBack, RecoveryFailed and Dead come out, through the `emit` callback. The core runs in the
frontend's event loop or in a process of its own (core_process.py), where the per-token work of
streaming no longer competes with scheduling for one Python thread.

The loop keeps up to `max_inflight_steps` steps on the wire: it schedules and sends step N+1 (and
N+2) before step N's tokens return, so the worker never waits on a round trip. A sequence that
finished at step N may already be in the steps after it; those extra tokens are dropped.

A worker is only a cache plus compute: when a rank fails (its stream ends, keepalive or the step
deadline gives up on it) the core keeps every request, drops the steps in flight (their tokens were
never streamed), sends the running sequences back to waiting, forgets the KV cache, and reconnects
to the same addresses until the whole group is back; then the sequences are recomputed from their
known tokens, as after a preemption. Past `worker_recovery_timeout` it drops every request (the
frontend fails them) and goes on reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from proto import worker_pb2 as wpb
from scheduler_svc.config import CoreConfig
from scheduler_svc.errors import InvalidRequest, WorkerUnavailable
from scheduler_svc.grammar import Grammars
from scheduler_svc.messages import (
    Add,
    CoreInfo,
    CoreStats,
    Dead,
    Event,
    Finish,
    Flushed,
    RecoveryFailed,
    Rejected,
    Sample,
    StepOutputs,
    Update,
    WorkersBack,
    WorkersLost,
)
from scheduler_svc.scheduler import Batch, Scheduler
from scheduler_svc.sequence import FinishReason, Sequence
from scheduler_svc.worker_client import WorkerGroup, from_step_result, to_step_request

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 600.0  # seconds for every worker to load its weights and answer ready


class EngineCore:
    def __init__(
        self,
        config: CoreConfig,
        workers: WorkerGroup | tuple[str, ...],
        eos_token_ids: frozenset[int],
        emit: Callable[[Event], None],
        tokenizer: str | None = None,
    ) -> None:
        """`workers`: the workers' addresses, or a group of this process's own (the in-process benchmark's,
        which cannot fail apart from this process: no recovery). `tokenizer`: the directory of the tokenizer
        whose vocabulary grammars compile against (None: no structured output)."""
        self.config = config
        self.tokenizer = tokenizer
        self.emit = emit
        self.eos_token_ids = eos_token_ids
        self.addresses = workers if isinstance(workers, tuple) else ()
        self.workers = self._group() if isinstance(workers, tuple) else workers
        self.winfo: wpb.WorkerInfo | None = None
        self.scheduler: Scheduler | None = None
        self.seqs: dict[int, Sequence] = {}
        self.num_added = 0
        self.dead: str | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sent: deque[float] = deque()
        self._queued: list[float] = []  # queue times of the sequences first scheduled since the last StepOutputs
        self._last_done = 0.0
        self.grammars: Grammars | None = None
        self._compiling: dict[int, asyncio.Task[None]] = {}  # constrained seqs not queued yet

    async def start(self) -> CoreInfo:
        winfo = self.winfo = await self.workers.connect(CONNECT_TIMEOUT)
        self.config = config = self.config.within(winfo.max_num_seqs, winfo.max_num_batched_tokens, winfo.max_model_len)
        self.scheduler = Scheduler(config, winfo.num_kv_blocks, winfo.block_size, set(self.eos_token_ids))
        if self.tokenizer and winfo.structured_output:
            self.grammars = Grammars(self.tokenizer, winfo.vocab_size)
            await self.grammars.ready()
        self._loop_task = asyncio.create_task(self._loop())
        max_model_len = config.max_model_len or winfo.max_model_len
        return CoreInfo(max_model_len, winfo.vocab_size, winfo.block_size, winfo.num_kv_blocks, winfo.world_size)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in self._compiling.values():
            task.cancel()
        if self.grammars is not None:
            self.grammars.close()
        await self.workers.close(graceful=True)

    async def wait_dead(self) -> str:
        """Returns why, once the step loop has ended for good (a bug, or workers back with other limits)."""
        assert self._loop_task is not None, "start() first"
        await asyncio.shield(self._loop_task)
        return self.dead or "the engine loop ended"

    def add(self, msg: Add) -> None:
        assert self.scheduler is not None, "start() first"
        seq = Sequence(msg.seq_id, list(msg.prompt), msg.params, max_len=len(msg.prompt) + msg.params.max_tokens)
        seq.arrival = time.monotonic()
        if msg.leader is not None:
            seq.leader = self.seqs.get(msg.leader)
        self.seqs[seq.seq_id] = seq
        self.num_added += 1
        if msg.params.constraint is None:
            self.scheduler.add(seq)
            self._wake.set()
        else:
            self._compiling[seq.seq_id] = asyncio.create_task(self._constrain(seq))

    async def _constrain(self, seq: Sequence) -> None:
        """Queues a constrained seq once its grammar is compiled (rejects it if it does not compile)."""
        assert self.scheduler is not None and seq.params.constraint is not None
        try:
            if self.grammars is None:
                raise InvalidRequest("structured output is off here: its workers lack xgrammar or the tokenizer")
            seq.grammar = await self.grammars.start(seq.params.constraint)
        except Exception as e:
            if not isinstance(e, InvalidRequest):
                log.exception("starting the grammar of seq %d failed", seq.seq_id)
            self.seqs.pop(seq.seq_id, None)
            self.emit(Rejected(seq.seq_id, str(e)))
            return
        finally:
            self._compiling.pop(seq.seq_id, None)
        self.scheduler.add(seq)
        self._wake.set()

    def finish(self, msg: Finish) -> None:
        if (task := self._compiling.pop(msg.seq_id, None)) is not None:
            task.cancel()  # aborted before its grammar was ready: it was never queued
            self.seqs.pop(msg.seq_id, None)
            return
        seq = self.seqs.pop(msg.seq_id, None)
        if seq is not None and self.scheduler is not None and not seq.is_finished:
            self.scheduler.finish(seq, msg.reason)
            self._wake.set()  # its removal goes to the workers with the next step

    def flush(self) -> None:
        """Empties the prefix cache unless a block is in use; answers Flushed, with the Cleared event."""
        assert self.scheduler is not None, "start() first"
        ok = self.scheduler.blocks.flush()
        self.emit(self._outputs([], 0.0))
        self.emit(Flushed(ok))

    def stats(self) -> CoreStats:
        sched = self.scheduler
        assert sched is not None, "start() first"
        blocks = sched.blocks
        return CoreStats(
            self.num_added,
            len(sched.waiting),
            len(sched.running),
            blocks.num_free,
            blocks.num_queries,
            blocks.num_hits,
            sched.num_preemptions,
        )

    # ---- the step loop ----

    async def _loop(self) -> None:
        try:
            while True:
                try:
                    await self._step()
                except WorkerUnavailable as e:
                    if not self.addresses:  # a group of this process's own
                        raise
                    await self._recover(str(e))
        except WorkerUnavailable as e:
            self._die(str(e))
        except Exception as e:  # a bug here must not hang clients: fail them loudly
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {e!r}")

    async def _step(self) -> None:
        """Steps until a worker fails."""
        assert self.scheduler is not None
        sched = self.scheduler
        inflight: deque[Batch] = deque()
        ready: tuple[list[Update], float] | None = None
        reported = self.stats()  # what the frontend starts from: nothing to report until it changes
        try:
            while True:
                while len(inflight) < self.config.max_inflight_steps:
                    batch = sched.schedule()
                    if batch is None:
                        break
                    await self.workers.send(to_step_request(batch, sched.eos_token_ids))
                    self._sent.append(time.perf_counter())
                    if batch.added:
                        now = time.monotonic()
                        self._queued += [now - s.arrival for s in batch.added if s.epoch == 0]
                    inflight.append(batch)
                if ready is not None:
                    # Outputs go after the next step is on its way: streaming them is the largest
                    # per-token cost and need not delay the worker. A stop string the frontend
                    # finds ends its sequence a step or two later; those tokens are dropped.
                    out = self._outputs(*ready)
                    reported = out.stats
                    self.emit(out)
                    ready = None
                    if not inflight:
                        continue  # what it finished may free blocks or leave removals to send
                if not inflight:
                    if self.stats() != reported or sched.blocks.events:  # an abort or an eviction since
                        out = self._outputs([], 0.0)
                        reported = out.stats
                        self.emit(out)
                    self._wake.clear()
                    await self.workers.wait(self._wake)  # a rank that fails while idle ends it too
                    continue
                res = await self.workers.receive()
                now = time.perf_counter()
                # Steps run in order: one starts when sent or when the previous ended, if later.
                took = now - max(self._sent.popleft(), self._last_done)
                self._last_done = now
                batch = inflight.popleft()
                assert res.step_id == batch.step_id, (res.step_id, batch.step_id)
                samples = from_step_result(res)
                updated = sched.postprocess(batch, {k: s.token_id for k, s in samples.items()})
                ready = self._updates(updated, samples), took
        except WorkerUnavailable:
            if ready is not None:  # tokens the scheduler has appended: they must be streamed
                self.emit(self._outputs(*ready))
            raise

    async def _recover(self, why: str) -> None:
        """Holds every request until the whole group is back, then resumes them (see the docstring)."""
        assert self.scheduler is not None and self.winfo is not None
        lost = time.monotonic()
        resumed = self.scheduler.reset()
        self._sent.clear()
        log.warning("lost the worker group (%s); %d running requests resume when it is back", why, len(resumed))
        # The gauges (nothing runs, every block is free) and a CacheCleared for the KV subscribers,
        # in place of any event not yet sent: those named blocks the lost workers held.
        self.emit(self._outputs([], 0.0))
        self.emit(WorkersLost(why))
        await self.workers.close()
        timeout: float | None = self.config.worker_recovery_timeout
        while True:
            self.workers = self._group()
            try:
                winfo = await self.workers.connect(timeout)
                break
            except WorkerUnavailable as e:
                await self.workers.close()
                if timeout is None:
                    raise
                timeout = None  # from now on, reconnect for as long as it takes
                self._drop_all(f"the workers were not back within {self.config.worker_recovery_timeout:g} s: {e}")
        if (got := _limits(winfo)) != (had := _limits(self.winfo)):
            raise WorkerUnavailable(f"the workers came back with other limits: {got} instead of {had}")
        took = time.monotonic() - lost
        held = [seq for seq in resumed if not seq.is_finished]
        tokens = sum(len(seq.token_ids) for seq in held)
        log.warning("the worker group is back after %.1f s; resuming %d requests (%d tokens)", took, len(held), tokens)
        self.emit(WorkersBack(len(held), tokens, took))

    def _drop_all(self, why: str) -> None:
        assert self.scheduler is not None
        log.error("failing %d requests: %s", len(self.seqs), why)
        for seq in self.seqs.values():
            self.scheduler.finish(seq, FinishReason.ABORT)
        self.seqs.clear()
        self.emit(RecoveryFailed(why))

    def _group(self) -> WorkerGroup:
        return WorkerGroup(list(self.addresses), self.config.worker_step_timeout)

    def _outputs(self, updates: list[Update], took: float) -> StepOutputs:
        """A step's tokens with the counts as of now, and the prefix cache's events and the queue times
        gathered since the last StepOutputs."""
        assert self.scheduler is not None
        queued, self._queued = tuple(self._queued), []
        return StepOutputs(updates, took, self.stats(), self.scheduler.blocks.take_events(), queued)

    def _updates(self, updated: list[Sequence], samples: dict[int, Sample]) -> list[Update]:
        out: list[Update] = []
        for seq in updated:
            sid = seq.seq_id
            if seq.is_finished:
                self.seqs.pop(sid, None)
            out.append(
                (
                    sid,
                    seq.token_ids[-1],
                    seq.finish_reason,
                    seq.num_cached_tokens,
                    samples[sid] if seq.params.logprobs else None,
                )
            )
        return out

    def _die(self, why: str) -> None:
        self.dead = why
        log.error("engine stopped: %s", why)
        self.emit(Dead(why))


def _limits(info: wpb.WorkerInfo) -> tuple[int, ...]:
    """What the scheduler and its requests were sized by: a group that comes back must match it."""
    return (
        info.world_size,
        info.num_kv_blocks,
        info.block_size,
        info.max_model_len,
        info.vocab_size,
        info.max_num_seqs,
        info.max_num_batched_tokens,
    )
