"""The scheduler's frontend engine: validates requests, streams each one's outputs as text.

It tokenizes, checks each request against the model, and hands its token ids to the engine core
(core.py), which schedules and steps the workers. Each step's sampled tokens come back as one
StepOutputs; the frontend detokenizes them, checks stop strings and queues each request's message.
With `core_process` (the default) the core runs in a process of its own (core_process.py);
otherwise in this event loop, where tests can inspect its scheduler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from transformers import AutoTokenizer

from nanovllm_grpc.constraints import load_eos_ids
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import EngineCore
from scheduler_svc.core_process import ProcessCore
from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.errors import InvalidRequest, Overloaded, ShuttingDown, WorkerUnavailable
from scheduler_svc.kv_events import KvLog
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
    StepOutputs,
    Update,
    WorkersBack,
    WorkersLost,
)
from scheduler_svc.metrics import Load, Metrics
from scheduler_svc.prompts import Prompts, check_request
from scheduler_svc.request import Output, Request
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason
from scheduler_svc.worker_client import WorkerGroup

log = logging.getLogger(__name__)
FLUSH_ANSWER_TIMEOUT = 30.0  # seconds; the core answers a Flush at once, unless it is dead


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of a seeded request draws from a seed of its own, so the n samples differ
    and each is reproducible; unseeded samples already differ (the worker seeds by sequence)."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index * 0x9E3779B97F4A7C15) % 2**64)


class Engine:
    def __init__(self, config: SchedulerConfig, workers: WorkerGroup | None = None) -> None:
        """`workers` replaces the gRPC worker group (the in-process benchmark passes its own; the
        core then runs in this process)."""
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = load_eos_ids(config.model, self.tokenizer)
        self.prompts = Prompts(self.tokenizer, config.max_prompt_bytes)
        if workers is not None and config.core_process:
            raise ValueError("a worker group of this process needs the core in this process (core_process=False)")
        eos = frozenset(self.eos_token_ids)
        self.core: EngineCore | ProcessCore = (
            ProcessCore(config.core, config.workers, eos, self._on_event, config.model)
            if config.core_process
            else EngineCore(config.core, workers or config.workers, eos, self._on_event, config.model)
        )
        self.info: CoreInfo | None = None
        self.stats: CoreStats | None = None  # as of the last step
        self.requests: dict[int, Request] = {}  # by seq_id: one per sample
        self.by_request_id: dict[str, list[Request]] = {}
        self.kv = KvLog()  # the prefix cache's events, for SubscribeKvEvents
        self._flushed: asyncio.Future[bool] | None = None
        self.dead: str | None = None
        self.lost: str | None = None  # why, while a worker rank is lost (until the group is back)
        self.down: str | None = None  # why, once the workers stayed away past the recovery timeout
        self.on_serving: Callable[[bool], None] = lambda serving: None  # the server's health status
        self.draining = False
        self.metrics = Metrics(self.load, config.model_name, config.core.enable_prefix_caching)
        self.num_added = 0
        self._ids = itertools.count()
        self._dead: asyncio.Future[str] | None = None

    async def start(self) -> None:
        self._dead = asyncio.get_running_loop().create_future()
        self.info = await self.core.start()
        self.prompts.max_tokens = self.info.max_model_len - 1  # leaves room for one output token

    async def stop(self) -> None:
        await self.core.stop()
        self.prompts.close()

    def num_waiting(self) -> int:
        """Requests queued in the core, counting the Adds it has not seen yet."""
        if self.stats is None:
            return self.num_added
        return self.stats.waiting + self.num_added - self.stats.num_added

    def load(self) -> Load | None:
        """What the metrics and the status line read; None until the workers are ready."""
        if self.info is None:
            return None
        stats = self.stats or CoreStats(0, 0, 0, self.info.num_blocks, 0, 0, 0)  # no step yet
        return Load(self.info, stats, self.num_waiting())

    # ---- requests ----

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Streams one request's outputs, each tagged with its sample's index (params.n samples);
        closing the iterator early aborts the request."""
        if self.dead is not None:
            raise WorkerUnavailable(self.dead)
        if self.down is not None:
            raise WorkerUnavailable(f"no worker group: {self.down}")
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests; retry on another replica")
        if self.info is None:
            raise WorkerUnavailable("the engine is not started yet")
        check_request(prompt, params, self.info)
        limit = self.config.max_queued_requests
        if limit and (queued := self.num_waiting()) >= limit:
            raise Overloaded(f"{queued} requests are already queued (limit {limit}); retry later")
        if request_id in self.by_request_id:
            raise InvalidRequest(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        samples = []
        for i in range(params.n):
            detok = Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
            req = Request(request_id, next(self._ids), len(prompt), detok, index=i, queue=queue)
            self.requests[req.seq_id] = req
            samples.append(req)
            leader = samples[0].seq_id if i else None
            self.core.add(Add(req.seq_id, list(prompt), sample_params(params, i), leader))
        self.by_request_id[request_id] = samples
        self.num_added += params.n
        reason, first, last, streamed, pending = "abort", 0.0, 0.0, 0, params.n
        arrival = samples[0].arrival
        carry: Output | BaseException | None = None
        try:
            while pending:
                item = carry if carry is not None else await queue.get()
                carry = None
                while isinstance(item, Output) and item.finish_reason is None and not queue.empty():
                    nxt = queue.get_nowait()  # coalesce what piled up into one message
                    if isinstance(nxt, Output) and nxt.index == item.index:
                        item.merge(nxt)
                    else:
                        carry = nxt
                        break
                if isinstance(item, BaseException):
                    reason = "error"
                    raise item
                now = time.monotonic()
                if not first:
                    first = now
                    self.metrics.first_token(arrival, first, len(prompt))
                streamed += len(item.token_ids)
                self.metrics.streamed(len(item.token_ids), now - last if last else None)
                last = now
                if item.finish_reason is not None:
                    reason = item.finish_reason.value
                    pending -= 1
                yield item
        finally:
            self.metrics.finish(reason, arrival, first, last, streamed)
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        for req in self.by_request_id.pop(request_id, ()):
            self.requests.pop(req.seq_id, None)
            if not req.finished and self.dead is None:
                req.finished = True
                self.core.finish(Finish(req.seq_id, FinishReason.ABORT))

    def cancel(self, request_id: str) -> None:
        """Ends a request from outside its stream (the gateway's Abort): each unfinished sample's
        stream ends at once with finish reason abort; unknown or finished ids are ignored."""
        for req in self.by_request_id.get(request_id, ()):
            if req.finished:
                continue
            req.finished = True
            self.requests.pop(req.seq_id, None)
            if self.dead is None:
                self.core.finish(Finish(req.seq_id, FinishReason.ABORT))
            out = req.held or Output(req.index)
            req.held = None
            out.finish_reason = FinishReason.ABORT
            out.prompt_tokens = req.num_prompt_tokens
            out.completion_tokens = req.num_output_tokens
            req.queue.put_nowait(out)

    async def flush_cache(self, timeout: float) -> tuple[bool, str]:
        """Empties the prefix cache once no request runs, waiting up to `timeout` s for that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.requests and loop.time() < deadline:
            await asyncio.sleep(0.05)  # an admin call: a poll is simpler than an event per request
        if self.requests:
            return False, f"{len(self.requests)} requests still running after {timeout:g} s; nothing flushed"
        self._flushed = loop.create_future()
        self.core.flush()
        if not await asyncio.wait_for(self._flushed, FLUSH_ANSWER_TIMEOUT):
            return False, "a request started meanwhile and holds KV blocks; nothing flushed"
        return True, "prefix cache flushed"

    async def wait_dead(self) -> str:
        """Returns why, once the core has stopped for good (a worker died, or a bug)."""
        assert self._dead is not None, "start() first"
        return await asyncio.shield(self._dead)

    async def drain(self, timeout: float, force: asyncio.Event | None = None) -> None:
        """Refuses new requests and waits up to `timeout` s (or until `force`) for the running ones;
        those left get UNAVAILABLE, so their clients know to retry elsewhere."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.requests and loop.time() < deadline and not (force is not None and force.is_set()):
            await asyncio.sleep(0.05)  # only while shutting down: a poll is simpler than an event per request
        for req in self.requests.values():
            req.queue.put_nowait(
                ShuttingDown(f"the server shut down before this request finished ({timeout:g} s drain)")
            )
        self.requests.clear()

    # ---- the core's events ----

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            if event.step_seconds:
                self.metrics.step(event.step_seconds)
            if event.queued:
                self.metrics.queued(event.queued)
            self.stats = event.stats
            if event.kv:
                self.kv.publish(event.kv)
            self._emit(event.updates)
        elif isinstance(event, Rejected):
            req = self.requests.pop(event.seq_id, None)
            if req is not None:
                req.finished = True
                req.queue.put_nowait(InvalidRequest(event.why))
        elif isinstance(event, Flushed):
            if self._flushed is not None and not self._flushed.done():
                self._flushed.set_result(event.ok)
        elif isinstance(event, WorkersLost):
            self.lost = event.why
            self.metrics.lost()
            self.on_serving(False)
        elif isinstance(event, WorkersBack):
            self.lost = self.down = None
            self.metrics.back(event)
            self.on_serving(True)
        elif isinstance(event, RecoveryFailed):
            self.down = event.why
            self._fail_all(event.why)
        elif isinstance(event, Dead):
            self._die(event.why)

    def _emit(self, updates: list[Update]) -> None:
        interval = self.config.stream_interval
        for seq_id, token, finish_reason, cached, sample in updates:
            req = self.requests.get(seq_id)
            if req is None:
                continue  # aborted, or ended by a stop string: its later tokens are dropped
            req.num_output_tokens += 1
            stop_str = req.detok.add(token)
            if stop_str is not None and finish_reason is None:
                finish_reason = FinishReason.STOP
                self.core.finish(Finish(seq_id, FinishReason.STOP))
            final = finish_reason is not None
            out = Output(req.index, [token], req.detok.delta(final))
            if sample is not None:
                out.logprobs.append(sample)
            if final:
                req.finished = True
                out.finish_reason = finish_reason
                out.stop_reason = stop_str or (str(token) if finish_reason is FinishReason.STOP else "")
                out.prompt_tokens = req.num_prompt_tokens
                out.completion_tokens = req.num_output_tokens
                out.cached_prompt_tokens = cached
                self.requests.pop(seq_id, None)
            if req.held is not None:
                req.held.merge(out)
                out = req.held
            # Each request flushes at its own phase: requests started together then do not all
            # send in the same step, a burst that would hold this loop (and the next step) back.
            n = req.num_output_tokens
            if final or n == 1 or (n + seq_id) % interval == 0:
                req.held = None
                req.queue.put_nowait(out)
            else:
                req.held = out  # streamed with the next tokens

    def _fail_all(self, why: str) -> None:
        """Ends every request's stream with UNAVAILABLE; the core has dropped (or will drop) them."""
        for req in list(self.requests.values()):
            req.queue.put_nowait(WorkerUnavailable(why))
        self.requests.clear()

    def _die(self, why: str) -> None:
        if self.dead is not None:
            return
        self.dead = why
        log.error("engine stopped: %s", why)
        self._fail_all(why)
        if self._dead is not None and not self._dead.done():
            self._dead.set_result(why)
