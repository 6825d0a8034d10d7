"""The scheduler's engine: validates requests, runs the step loop, streams outputs per request.

The loop keeps up to `max_inflight_steps` steps on the wire: it schedules and sends step N+1 (and
N+2) before step N's tokens return, so the worker never waits on a round trip; with three, the
scheduler has a whole device step of slack to answer step N with step N+3. A sequence that
finished at step N may already be in the steps after it; those extra tokens are dropped, never
streamed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import AutoTokenizer

from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.errors import InvalidRequest, Overloaded, ShuttingDown, WorkerUnavailable
from scheduler_svc.metrics import Metrics
from scheduler_svc.request import Output, Request, load_eos_ids
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from scheduler_svc.sequence import FinishReason, Sequence
from scheduler_svc.worker_client import Sample, WorkerGroup, from_step_result, to_step_request

log = logging.getLogger(__name__)
MAX_INFLIGHT_STEPS = 4


@dataclass(frozen=True)
class EngineConfig:
    model: str  # directory holding the tokenizer (and config.json)
    worker_addresses: tuple[str, ...]
    model_name: str = ""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the worker's
    enable_prefix_caching: bool = True
    max_inflight_steps: int = 3
    max_queued_requests: int = 0  # 0: unbounded
    # Tokens per streamed message (the first and last go out at once). Each message costs both
    # ends tens of microseconds of Python gRPC, so with hundreds of streams a few tokens a message
    # keep the scheduler process and its clients from becoming the bottleneck.
    stream_interval: int = 1
    connect_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.worker_addresses:
            raise ValueError("worker_addresses is empty")
        if not 1 <= self.max_inflight_steps <= MAX_INFLIGHT_STEPS:
            raise ValueError(f"max_inflight_steps must be 1 to {MAX_INFLIGHT_STEPS}, got {self.max_inflight_steps}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}")


class Engine:
    def __init__(self, config: EngineConfig, workers: WorkerGroup | None = None) -> None:
        """`workers` replaces the gRPC worker group (the in-process benchmark passes its own)."""
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = load_eos_ids(config.model, self.tokenizer)
        self.workers = workers or WorkerGroup(list(config.worker_addresses))
        self.scheduler: Scheduler | None = None
        self.requests: dict[int, Request] = {}
        self.by_request_id: dict[str, Request] = {}
        self.dead: str | None = None
        self.draining = False
        self.metrics = Metrics(self)
        self.max_model_len = 0
        self.vocab_size = 0
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        info = await self.workers.connect(self.config.connect_timeout)
        cfg = self.config
        self.max_model_len = min(cfg.max_model_len or info.max_model_len, info.max_model_len)
        self.vocab_size = info.vocab_size
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=info.num_kv_blocks,
                block_size=info.block_size,
                max_num_seqs=min(cfg.max_num_seqs, info.max_num_seqs),
                max_num_batched_tokens=min(cfg.max_num_batched_tokens, info.max_num_batched_tokens),
                max_model_len=self.max_model_len,
                enable_prefix_caching=cfg.enable_prefix_caching,
            ),
            self.eos_token_ids,
        )
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self.workers.close()

    # ---- requests ----

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not messages:
            raise InvalidRequest("chat.messages is empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model's tokenizer has no chat template; send a text prompt instead")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:  # templates raise on what they refuse, e.g. roles out of order
            raise InvalidRequest(f"the chat template rejected the messages: {e}") from e
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is out of range: ids must be in [0, {self.vocab_size})")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"sampling.stop_token_ids has {bad}, out of range [0, {self.vocab_size})")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        assert self.scheduler is not None
        need = self.scheduler.blocks.blocks_for(total)
        if need > self.scheduler.config.num_blocks:
            raise InvalidRequest(
                f"prompt + max_tokens needs {need} KV blocks but the cache has only "
                f"{self.scheduler.config.num_blocks}; lower max_tokens or shorten the prompt"
            )

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Streams one request's outputs; closing the iterator early aborts the request."""
        if self.dead is not None:
            raise WorkerUnavailable(self.dead)
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests; retry on another replica")
        if self.scheduler is None:
            raise WorkerUnavailable("the engine is not started yet")
        self._validate(prompt, params)
        limit = self.config.max_queued_requests
        if limit and len(self.scheduler.waiting) >= limit:
            raise Overloaded(f"{len(self.scheduler.waiting)} requests are already queued (limit {limit}); retry later")
        if request_id in self.by_request_id:
            raise InvalidRequest(f"request_id {request_id!r} is already in use")
        seq = Sequence(next(self._ids), list(prompt), params, max_len=len(prompt) + params.max_tokens)
        req = Request(request_id, seq, Detokenizer(self.tokenizer, params.stop))
        self.requests[seq.seq_id] = req
        self.by_request_id[request_id] = req
        self.scheduler.add(seq)
        self._wake.set()
        reason, first, last, streamed = "abort", 0.0, 0.0, 0
        try:
            while True:
                item = await req.queue.get()
                while not req.queue.empty() and isinstance(item, Output) and item.finish_reason is None:
                    nxt = req.queue.get_nowait()  # coalesce what piled up into one message
                    if isinstance(nxt, BaseException):
                        item = nxt
                        break
                    item.merge(nxt)
                if isinstance(item, BaseException):
                    reason = "error"
                    raise item
                last = time.monotonic()
                if not first:
                    first = last
                    self.metrics.first_token(req.arrival, first, seq.num_prompt_tokens)
                streamed += len(item.token_ids)
                self.metrics.streamed(len(item.token_ids))
                if item.finish_reason is not None:
                    reason = item.finish_reason.value
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.metrics.finish(reason, req.arrival, first, last, streamed)
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        req = self.by_request_id.pop(request_id, None)
        if req is None:
            return
        self.requests.pop(req.seq.seq_id, None)
        if self.scheduler is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, FinishReason.ABORT)
            self._wake.set()

    async def wait_dead(self) -> str:
        """Returns why, once the step loop has ended for good (a worker died, or a bug)."""
        assert self._loop_task is not None, "start() first"
        await asyncio.shield(self._loop_task)
        return self.dead or "the engine loop ended"

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

    # ---- the step loop ----

    async def _loop(self) -> None:
        assert self.scheduler is not None
        sched = self.scheduler
        inflight: deque = deque()
        ready: tuple[list[Sequence], dict[int, Sample]] | None = None
        try:
            while True:
                while len(inflight) < self.config.max_inflight_steps:
                    batch = sched.schedule()
                    if batch is None:
                        break
                    await self.workers.send(to_step_request(batch, self.eos_token_ids))
                    self.metrics.step_sent()
                    inflight.append(batch)
                if ready is not None:
                    # Streaming comes after the next step is on its way: detokenizing is the largest
                    # per-token cost here and need not delay the worker. A stop string found now
                    # ends its sequence one step later; that step's token is dropped.
                    self._emit(*ready)
                    ready = None
                    if not inflight:
                        continue  # what it finished may free blocks or leave removals to send
                if not inflight:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                res = await self.workers.receive()
                self.metrics.step_done()
                batch = inflight.popleft()
                assert res.step_id == batch.step_id, (res.step_id, batch.step_id)
                samples = from_step_result(res)
                ready = sched.postprocess(batch, {k: s.token_id for k, s in samples.items()}), samples
        except WorkerUnavailable as e:
            self._die(str(e))
        except Exception as e:  # a bug here must not hang clients: fail them loudly
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {e!r}")

    def _emit(self, updated: list[Sequence], samples: dict[int, Sample]) -> None:
        assert self.scheduler is not None
        interval = self.config.stream_interval
        for seq in updated:
            req = self.requests.get(seq.seq_id)
            if req is None:
                continue
            token = seq.token_ids[-1]
            stop_str = req.detok.add(token)
            if stop_str is not None and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            final = seq.is_finished
            out = Output(token_ids=[token], text=req.detok.delta(final))
            if seq.params.logprobs:
                out.logprobs.append(samples[seq.seq_id])
            if final:
                out.finish_reason = seq.finish_reason
                out.stop_reason = stop_str or (str(token) if seq.finish_reason is FinishReason.STOP else "")
                out.prompt_tokens = seq.num_prompt_tokens
                out.completion_tokens = seq.num_output_tokens
                out.cached_prompt_tokens = seq.num_cached_tokens
                self.requests.pop(seq.seq_id, None)
            if req.held is not None:
                req.held.merge(out)
                out = req.held
            # Each seq flushes at its own phase: requests started together then do not all send in
            # the same step, a burst that would hold this loop (and the next step) back.
            n = seq.num_output_tokens
            if final or n == 1 or (n + seq.seq_id) % interval == 0:
                req.held = None
                req.queue.put_nowait(out)
            else:
                req.held = out  # streamed with the next tokens

    def _die(self, why: str) -> None:
        self.dead = why
        log.error("engine stopped: %s", why)
        for req in list(self.requests.values()):
            req.queue.put_nowait(WorkerUnavailable(why))
        self.requests.clear()
