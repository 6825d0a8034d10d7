"""The scheduler's side of the step stream: one bidirectional call per worker rank.

Conversion between scheduler dataclasses and worker protobufs happens here and nowhere else.
Every rank gets every step; rank 0 answers with the sampled tokens. Other ranks answer nothing, so
a read on their stream returns only when the rank fails, which is how a dead rank is noticed.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import FIRST_COMPLETED

import grpc

from nanovllm_grpc.process import PING_INTERVAL_MS, STEP_ACCEPTED, STEP_STREAM_OPTIONS
from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.messages import Sample
from scheduler_svc.sampling_params import Constraint
from scheduler_svc.scheduler import Batch
from scheduler_svc.sequence import Sequence

log = logging.getLogger(__name__)


def to_step_request(batch: Batch, eos_token_ids: set[int]) -> wpb.StepRequest:
    req = wpb.StepRequest(
        step_id=batch.step_id,
        removed=batch.removed,
        seq_ids=[s.seq_id for s in batch.seqs],
        num_tokens=batch.num_tokens,
        block_seq_ids=[s for s, _ in batch.new_blocks],
        block_ids=[b for _, b in batch.new_blocks],
    )
    if batch.added:
        n_of = {s.seq_id: n for s, n in zip(batch.seqs, batch.num_tokens, strict=True)}
        for seq in batch.added:
            req.added.append(
                wpb.AddSeq(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_computed_tokens=seq.num_computed - n_of[seq.seq_id],
                    block_ids=seq.block_table,
                    sampling=_sampling(seq, eos_token_ids),
                    grammar=_grammar(seq.params.constraint),
                )
            )
    return req


def _grammar(c: Constraint | None) -> wpb.Grammar | None:
    if c is None:
        return None
    if isinstance(c.spec, tuple):
        return wpb.Grammar(kind=c.kind, choices=c.spec)
    return wpb.Grammar(kind=c.kind, spec=c.spec)


def _sampling(seq: Sequence, eos_token_ids: set[int]) -> wpb.SeqSampling:
    p = seq.params
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
    return wpb.SeqSampling(
        temperature=0.0 if p.greedy else p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        has_seed=p.seed is not None,
        seed=p.seed or 0,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        min_tokens=p.min_tokens,
        min_tokens_banned_ids=sorted(banned) if p.min_tokens else [],
        logprobs=p.logprobs,
        logit_bias_ids=[t for t, _ in p.logit_bias],
        logit_bias_values=[b for _, b in p.logit_bias],
    )


def from_step_result(res: wpb.StepResult) -> dict[int, Sample]:
    if not res.logprobs:
        return {s: Sample(t) for s, t in zip(res.seq_ids, res.token_ids, strict=True)}
    return {
        s: Sample(t, lp.logprob, tuple(lp.top_ids), tuple(lp.top_logprobs))
        for s, t, lp in zip(res.seq_ids, res.token_ids, res.logprobs, strict=True)
    }


# Keepalive pings find a worker that hangs (or whose host vanished) while its stream looks open; a
# dead process is seen at once, its socket being reset. The workers accept pings this often
# (worker_svc/server.py). A short reconnect backoff lets a restarted worker be found within a second.
CHANNEL_OPTIONS = [
    *STEP_STREAM_OPTIONS,
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", 4000),
    ("grpc.http2.ping_timeout_ms", 4000),  # any ping's, e.g. flow control's, which stand in for keepalive's
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WorkerGroup:
    """Connections to every rank of one model replica.

    A reader task per rank reads its stream at all times, idle too: rank 0's results go to a queue,
    and any end of any rank's stream sets `failure`, which every wait of the engine loop watches.
    """

    def __init__(self, addresses: list[str], step_timeout: float = 120.0) -> None:
        if not addresses:
            raise ValueError("at least one worker address is needed")
        self.addresses = addresses
        self.step_timeout = step_timeout
        self.channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [wgrpc.WorkerStub(c) for c in self.channels]
        self.calls: list[grpc.aio.StreamStreamCall] = []
        self.info: wpb.WorkerInfo | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._results: asyncio.Queue[wpb.StepResult] = asyncio.Queue()
        self.failure: asyncio.Future[str] | None = None

    async def connect(self, timeout: float | None) -> wpb.WorkerInfo:
        """Waits until every rank is ready and has accepted its step stream (None: however long that
        takes), retrying with backoff."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay, said = 0.05, loop.time()
        log.info("waiting for %d worker(s): %s", len(self.addresses), ", ".join(self.addresses))
        while (why := await self._attempt(deadline)) is not None:
            if deadline is not None and loop.time() > deadline:
                raise WorkerUnavailable(f"{why} (waited {timeout:g} s)")
            if loop.time() - said > 30:
                log.info("still waiting: %s", why)
                said = loop.time()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log.info("worker group ready: %s (%d ranks)", ", ".join(self.addresses), len(self.addresses))
        self.failure = loop.create_future()
        self._readers = [asyncio.create_task(self._read(k)) for k in range(len(self.calls))]
        assert self.info is not None
        return self.info

    async def _attempt(self, deadline: float | None) -> str | None:
        """Describes every rank and opens its step stream; None on success, else why not."""
        loop = asyncio.get_running_loop()

        def within(most: float) -> float:  # seconds for one call: at most `most`, and not past the deadline
            return most if deadline is None else min(most, max(deadline - loop.time(), 0.05))

        infos = []
        for addr, stub in zip(self.addresses, self.stubs, strict=True):
            try:
                info = await stub.Describe(wpb.DescribeRequest(), timeout=within(5.0), wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                return f"worker {addr} is not answering yet: {e.details()}"
            if not info.ready:
                return f"worker {addr} is loading its model"
            infos.append(info)
        ranks = sorted(i.rank for i in infos)
        if ranks != list(range(len(infos))) or any(i.world_size != len(infos) for i in infos):
            return f"worker ranks {ranks} do not form one group of size {len(infos)}"
        order = sorted(range(len(infos)), key=lambda k: infos[k].rank)
        self.stubs = [self.stubs[k] for k in order]
        self.addresses = [self.addresses[k] for k in order]
        self.info = infos[order[0]]
        self.calls = [stub.Step() for stub in self.stubs]
        for addr, call in zip(self.addresses, self.calls, strict=True):
            # A worker whose old stream is still ending (its scheduler lost it) waits for it a while.
            try:
                metadata = await asyncio.wait_for(call.initial_metadata(), within(30.0))
                accepted = any(k == STEP_ACCEPTED for k, _ in metadata)
            except (asyncio.TimeoutError, grpc.aio.AioRpcError):
                accepted = False
            if not accepted:
                why = await call.details() if call.done() else "no answer"
                for c in self.calls:
                    c.cancel()
                return f"worker {addr} did not take the step stream: {why}"
        return None

    async def _read(self, rank: int) -> None:
        call = self.calls[rank]
        try:
            while (msg := await call.read()) is not grpc.aio.EOF and rank == 0:
                self._results.put_nowait(msg)
            why = "closed its stream" if msg is grpc.aio.EOF else "sent an unexpected message"
        except grpc.aio.AioRpcError as e:
            why = f"failed: {e.code().name} {e.details()}"
        except asyncio.CancelledError:
            return
        self._fail(f"worker rank {rank} ({self.addresses[rank]}) {why}")

    def _fail(self, why: str) -> None:
        if self.failure is not None and not self.failure.done():
            log.error("%s", why)
            self.failure.set_result(why)

    def _failed(self) -> bool:
        assert self.failure is not None
        return self.failure.done()

    def _error(self) -> WorkerUnavailable:
        assert self.failure is not None
        return WorkerUnavailable(self.failure.result())

    async def send(self, req: wpb.StepRequest) -> None:
        # A rank that died while the engine was idle: the live ranks must not get a step they cannot finish.
        if self._failed():
            raise self._error()
        await asyncio.gather(*(self._write(rank, req) for rank in range(len(self.calls))))

    async def _write(self, rank: int, req: wpb.StepRequest) -> None:
        try:
            await self.calls[rank].write(req)
        # InvalidStateError: the stream has already ended.
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError) as e:
            self._fail(f"sending a step to worker rank {rank} ({self.addresses[rank]}) failed: {e}")
            raise self._error() from e

    async def receive(self) -> wpb.StepResult:
        """The next step's result; WorkerUnavailable if a rank fails or none comes within step_timeout."""
        if self._failed():
            raise self._error()
        if not self._results.empty():
            return self._results.get_nowait()
        assert self.failure is not None
        get = asyncio.ensure_future(self._results.get())
        try:
            done, _ = await asyncio.wait({get, self.failure}, timeout=self.step_timeout, return_when=FIRST_COMPLETED)
        finally:
            get.cancel()  # a no-op once done; on our own cancellation, no task is left behind
        if get in done:
            return get.result()
        self._fail(
            f"worker rank 0 ({self.addresses[0]}) returned no step result in {self.step_timeout:g} s "
            "(--worker-step-timeout)"
        )
        raise self._error()

    async def wait(self, wake: asyncio.Event) -> None:
        """Waits for `wake` while idle; WorkerUnavailable as soon as a rank fails."""
        assert self.failure is not None
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({woken, self.failure}, return_when=FIRST_COMPLETED)
        finally:
            woken.cancel()
        if self._failed():
            raise self._error()

    async def close(self, graceful: bool = False) -> None:
        """Cancels the step streams; `graceful` ends them instead (the workers finish the steps
        sent), as a scheduler that stops does: tensor-parallel ranks take a cancel as their group
        lost, and restart."""
        if graceful and self.failure is not None and not self.failure.done():
            self.failure.set_result("the scheduler is stopping")  # the streams' ends are no failure now
            await asyncio.gather(*(c.done_writing() for c in self.calls), return_exceptions=True)
            await asyncio.wait(self._readers, timeout=5.0)
        for t in self._readers:
            t.cancel()
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)
