"""The public Generation service: protobuf <-> dataclass conversion, nothing more."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pbg
from scheduler_svc.engine import Engine
from scheduler_svc.errors import InvalidRequest, WorkerUnavailable
from scheduler_svc.request import Output
from scheduler_svc.sampling_params import Constraint, SamplingParams
from scheduler_svc.sequence import FinishReason

FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "logprobs",
)


def to_params(msg: pb.SamplingParams) -> SamplingParams:
    kwargs: dict = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    return SamplingParams(
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        constraint=to_constraint(msg),
        **kwargs,
    )


def to_constraint(msg: pb.SamplingParams | vpb.SamplingParams) -> Constraint | None:
    """The `constraint` oneof, which nanovllm.v1 and vllm.grpc.engine spell alike."""
    kind = msg.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        return Constraint(kind, tuple(msg.choice.choices))
    return Constraint(kind, "" if kind == "json_object" else getattr(msg, kind))


def to_response(request_id: str, out: Output) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=out.token_ids, text=out.text)
    for s in out.logprobs:
        msg.logprobs.append(
            pb.TokenLogprob(
                token_id=s.token_id,
                logprob=s.logprob or 0.0,
                top=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in zip(s.top_ids, s.top_logprobs, strict=True)],
            )
        )
    if out.finish_reason is not None:
        msg.finish_reason = FINISH[out.finish_reason]
        msg.stop_reason = out.stop_reason
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                cached_prompt_tokens=out.cached_prompt_tokens,
            )
        )
    return msg


class GenerationServicer(pbg.GenerationServicer):
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    async def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return await self.engine.prompts.text(request.text)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "chat":
            return await self.engine.prompts.chat(
                [{"role": m.role, "content": m.content} for m in request.chat.messages]
            )
        raise InvalidRequest("the request has no prompt: set text, token_ids or chat")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        params = to_params(request.sampling)
        stream = self.engine.generate(request_id, await self._prompt(request), params)
        try:
            async for out in stream:
                yield to_response(request_id, out)
        finally:
            await stream.aclose()  # on cancel or disconnect too: aborts and frees the blocks at once

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(
            token_ids=await self.engine.prompts.tokenize(request.text, request.add_special_tokens)
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        info = self.engine.info
        if info is None:
            raise WorkerUnavailable("the workers are still loading the model")
        return pb.ModelInfo(
            model_name=self.model_name,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=sorted(self.engine.eos_token_ids),
            block_size=info.block_size,
            num_kv_blocks=info.num_blocks,
            tensor_parallel_size=info.world_size,
        )
