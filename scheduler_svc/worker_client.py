"""The scheduler's side of the step stream: one bidirectional call per worker rank.

Conversion between scheduler dataclasses and worker protobufs happens here and nowhere else.
Every rank gets every step; rank 0 answers with the sampled tokens. Other ranks answer nothing, so
a read on their stream returns only when the rank fails, which is how a dead rank is noticed.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from nanovllm_grpc.process import STEP_STREAM_OPTIONS
from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.messages import Sample
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
    constrained = [s for s, sample in zip(batch.seqs, batch.samples, strict=True) if sample and s.grammar is not None]
    if constrained:
        req.mask_seq_ids.extend(s.seq_id for s in constrained)
        req.masks = b"".join(s.grammar.mask() for s in constrained)  # type: ignore[union-attr]
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
                )
            )
    return req


def _sampling(seq: Sequence, eos_token_ids: set[int]) -> wpb.SeqSampling:
    p = seq.params
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
    return wpb.SeqSampling(
        temperature=p.temperature,
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


class WorkerGroup:
    """Connections to every rank of one model replica."""

    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("at least one worker address is needed")
        self.addresses = addresses
        self.channels = [grpc.aio.insecure_channel(a, options=STEP_STREAM_OPTIONS) for a in addresses]
        self.stubs = [wgrpc.WorkerStub(c) for c in self.channels]
        self.calls: list[grpc.aio.StreamStreamCall] = []
        self.info: wpb.WorkerInfo | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self.failure: asyncio.Future[str] | None = None

    async def connect(self, timeout: float) -> wpb.WorkerInfo:
        """Waits until every rank answers Describe and is ready, then opens the step streams."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        infos = []
        log.info("waiting for %d worker(s): %s", len(self.addresses), ", ".join(self.addresses))
        for addr, stub in zip(self.addresses, self.stubs, strict=True):
            said = loop.time()
            while True:
                try:
                    info = await stub.Describe(wpb.DescribeRequest(), timeout=5.0, wait_for_ready=True)
                    if info.ready:
                        break
                    why = "loading its model"
                except grpc.aio.AioRpcError as e:
                    if loop.time() > deadline:
                        raise WorkerUnavailable(f"worker {addr} did not answer: {e.details()}") from e
                    why = "not answering yet"
                if loop.time() > deadline:
                    raise WorkerUnavailable(f"worker {addr} did not become ready in {timeout:.0f} s")
                if loop.time() - said > 30:
                    log.info("still waiting for worker %s: %s", addr, why)
                    said = loop.time()
                await asyncio.sleep(0.2)
            log.info("worker %s is ready (rank %d of %d)", addr, info.rank, info.world_size)
            infos.append(info)
        ranks = sorted(i.rank for i in infos)
        if ranks != list(range(len(infos))) or any(i.world_size != len(infos) for i in infos):
            raise WorkerUnavailable(f"worker ranks {ranks} do not form one group of size {len(infos)}")
        self.info = next(i for i in infos if i.rank == 0)
        order = sorted(range(len(infos)), key=lambda k: infos[k].rank)
        self.stubs = [self.stubs[k] for k in order]
        self.addresses = [self.addresses[k] for k in order]
        self.failure = loop.create_future()
        self.calls = [stub.Step() for stub in self.stubs]
        self._watchers = [asyncio.create_task(self._watch(k)) for k in range(1, len(self.calls))]
        return self.info

    async def _watch(self, rank: int) -> None:
        try:
            msg = await self.calls[rank].read()
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

    async def send(self, req: wpb.StepRequest) -> None:
        assert self.failure is not None
        # A rank that died while the engine was idle: its watcher has said which, and the live ranks
        # must not get a step they cannot finish.
        if self.failure.done():
            raise WorkerUnavailable(self.failure.result())
        await asyncio.gather(*(self._write(rank, req) for rank in range(len(self.calls))))

    async def _write(self, rank: int, req: wpb.StepRequest) -> None:
        try:
            await self.calls[rank].write(req)
        # InvalidStateError: the stream has already ended, as rank 0's does when it dies while the
        # engine is idle (no watcher reads rank 0's stream; its results do).
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError) as e:
            self._fail(f"sending a step to worker rank {rank} ({self.addresses[rank]}) failed: {e}")
            raise WorkerUnavailable(self.failure.result()) from e  # type: ignore[union-attr]

    async def receive(self) -> wpb.StepResult:
        assert self.failure is not None
        read = asyncio.ensure_future(self.calls[0].read())
        done, _ = await asyncio.wait({read, self.failure}, return_when=asyncio.FIRST_COMPLETED)
        if read not in done:
            read.cancel()
            raise WorkerUnavailable(self.failure.result())
        try:
            msg = read.result()
        except grpc.aio.AioRpcError as e:
            self._fail(f"worker rank 0 ({self.addresses[0]}) failed: {e.code().name} {e.details()}")
            raise WorkerUnavailable(self.failure.result()) from e
        if msg is grpc.aio.EOF:
            self._fail(f"worker rank 0 ({self.addresses[0]}) closed its stream")
            raise WorkerUnavailable(self.failure.result())
        return msg

    async def close(self) -> None:
        for t in self._watchers:
            t.cancel()
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)
