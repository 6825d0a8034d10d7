"""The worker's gRPC side: applies step events to per-sequence state and runs the model.

Protobuf <-> dataclass conversion happens here only. The model runner is built after the server
starts, so Describe answers (ready=False) while weights load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from worker_svc.model_runner import ModelRunner, Sampled
from worker_svc.seq_state import SamplingOptions, SeqState

log = logging.getLogger(__name__)


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


class WorkerServicer(wgrpc.WorkerServicer):
    def __init__(self, rank: int, world_size: int, device: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.runner: ModelRunner | None = None
        self._stream_lock = threading.Lock()

    def Describe(self, request: wpb.DescribeRequest, context: grpc.ServicerContext) -> wpb.WorkerInfo:
        info = wpb.WorkerInfo(rank=self.rank, world_size=self.world_size, device=self.device)
        r = self.runner
        if r is not None:
            info.ready = True
            info.num_kv_blocks = r.num_kv_blocks
            info.block_size = r.block_size
            info.max_model_len = r.max_model_len
            info.vocab_size = r.vocab_size
            info.max_num_seqs = r.config.max_num_seqs
            info.max_num_batched_tokens = r.config.max_num_batched_tokens
        return info

    def Step(self, requests: Iterator[wpb.StepRequest], context: grpc.ServicerContext) -> Iterator[wpb.StepResult]:
        if self.runner is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is still loading the model")
        if not self._stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler is already connected")
        try:
            yield from self._run(requests)
        finally:
            self._stream_lock.release()

    def _run(self, requests: Iterator[wpb.StepRequest]) -> Iterator[wpb.StepResult]:
        runner = self.runner
        assert runner is not None
        states: dict[int, SeqState] = {}
        for req in requests:
            for seq_id in req.removed:
                states.pop(seq_id, None)
            for msg in req.added:
                states[msg.seq_id] = to_state(msg)
            for seq_id, block_id in zip(req.block_seq_ids, req.block_ids, strict=True):
                states[seq_id].block_table.append(block_id)
            seqs = [states[s] for s in req.seq_ids]
            samples = runner.run(seqs, list(req.num_tokens)) if seqs else []
            if self.rank == 0:
                yield to_result(req.step_id, samples)
        log.info("scheduler stream closed; dropped %d sequences", len(states))
