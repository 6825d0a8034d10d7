"""vllm.grpc.engine messages <-> our dataclasses, for the gateway-facing servicer (vllm_servicer.py).

The gateway (SMG) tokenizes, renders chat templates and detokenizes itself: requests carry token
ids, responses carry token ids only. Fields that shape only the text it renders
(spaces_between_special_tokens, include_stop_str_in_output) change nothing here; fields that would
change the tokens and that we do not serve are refused, never ignored.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from scheduler_svc.errors import InvalidRequest, Unsupported
from scheduler_svc.kv_events import BlockRemoved, BlockStored, KvBatch
from scheduler_svc.prompts import Prompts
from scheduler_svc.request import Output
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason
from scheduler_svc.servicer import to_constraint

TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def check_supported(request: vpb.GenerateRequest) -> None:
    """Refuses what this engine does not serve yet, naming the field."""
    if request.HasField("mm_inputs") or request.extra_mm_inputs or request.HasField("media_refs"):
        raise Unsupported("multimodal inputs are not supported: this engine serves text-only models")
    if request.HasField("kv_transfer_params") or request.HasField("kv_transfer_params_json"):
        raise Unsupported("KV transfer (prefill/decode disaggregation) is not supported by this engine")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise InvalidRequest(f"data_parallel_rank {request.data_parallel_rank}: this engine has one rank, 0")
    p = request.sampling_params
    if p.HasField("prompt_logprobs"):
        raise InvalidRequest("prompt_logprobs is not supported; only the output tokens' logprobs are")
    if p.HasField("logprobs") and p.logprobs < 0:
        raise InvalidRequest(f"logprobs {p.logprobs} (every token) is not supported; ask for at most 20")


async def prompt_ids(request: vpb.GenerateRequest, prompts: Prompts) -> list[int]:
    kind = request.WhichOneof("input")
    p = request.sampling_params
    if kind == "tokenized":
        ids = list(request.tokenized.input_ids)
    elif kind == "text" and p.HasField("truncate_prompt_tokens"):
        ids = await prompts.tokenize(request.text, True)  # truncated below: only its bytes limit it here
    elif kind == "text":
        ids = await prompts.text(request.text)
    else:
        raise InvalidRequest("the request has no input: set tokenized or text")
    if p.HasField("truncate_prompt_tokens"):
        if p.truncate_prompt_tokens < 1:
            raise InvalidRequest(f"truncate_prompt_tokens must be >= 1, got {p.truncate_prompt_tokens}")
        ids = ids[-p.truncate_prompt_tokens :]
    return ids


def to_params(p: vpb.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """vLLM's defaults: unset max_tokens fills the context; 0 top_p and repetition_penalty mean unset."""
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else max(1, max_model_len - prompt_len),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed % 2**64 if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty or 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        min_tokens=p.min_tokens,
        ignore_eos=p.ignore_eos,
        # logprobs=0 asks for the sampled token's logprob alone; the worker then computes one top.
        logprobs=max(p.logprobs, 1) if p.HasField("logprobs") else 0,
        n=p.n or 1,
        skip_special_tokens=p.skip_special_tokens,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        constraint=to_constraint(p),
    )


def _logprobs(out: Output, num_top: int) -> vpb.OutputLogProbs | None:
    if not out.logprobs:
        return None
    msg = vpb.OutputLogProbs()
    for s in out.logprobs:
        msg.token_ids.append(s.token_id)
        msg.token_logprobs.append(s.logprob or 0.0)
        if num_top:
            msg.top_logprobs.append(vpb.TopLogProbs(token_ids=s.top_ids[:num_top], values=s.top_logprobs[:num_top]))
    return msg


def chunk(out: Output, prompt_len: int, num_top: int) -> vpb.GenerateResponse:
    """A streamed delta: this message's new tokens of sample `out.index`."""
    return vpb.GenerateResponse(
        chunk=vpb.GenerateStreamChunk(
            token_ids=out.token_ids,
            prompt_tokens=prompt_len,
            completion_tokens=len(out.token_ids),
            cached_tokens=out.cached_prompt_tokens,
            output_logprobs=_logprobs(out, num_top),
            index=out.index,
        )
    )


def complete(out: Output, params: SamplingParams, num_top: int) -> vpb.GenerateResponse:
    """The end of sample `out.index`: its tokens (all of them, or the last delta when streaming)."""
    assert out.finish_reason is not None
    msg = vpb.GenerateComplete(
        output_ids=out.token_ids,
        finish_reason=out.finish_reason.value,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=len(out.token_ids),
        cached_tokens=out.cached_prompt_tokens,
        output_logprobs=_logprobs(out, num_top),
        index=out.index,
    )
    if out.finish_reason is FinishReason.STOP and out.stop_reason:
        last = out.token_ids[-1] if out.token_ids else None
        if last is not None and out.stop_reason == str(last) and last in params.stop_token_ids:
            msg.matched_token_id = last
        elif out.stop_reason in params.stop:
            msg.matched_stop_str = out.stop_reason
    return vpb.GenerateResponse(complete=msg)


def _int64(h: int) -> int:
    """Our block hashes are unsigned 64-bit; the proto's are signed."""
    return h - 2**64 if h >= 2**63 else h


def kv_batch(batch: KvBatch, block_size: int, first_event_id: int) -> cpb.KvEventBatch:
    msg = cpb.KvEventBatch(sequence_number=batch.sequence, timestamp=batch.timestamp, dp_rank=0)
    for i, e in enumerate(batch.events, start=first_event_id):
        if isinstance(e, BlockStored):
            block = cpb.KvBlock(block_hash=_int64(e.block_hash), token_ids=e.token_ids, block_size=block_size)
            stored = cpb.KvBlocksStored(blocks=[block])
            if e.parent_hash is not None:
                stored.parent_block_hash = _int64(e.parent_hash)
            msg.events.append(cpb.KvCacheEvent(event_id=i, stored=stored))
        elif isinstance(e, BlockRemoved):
            removed = cpb.KvBlocksRemoved(block_hashes=[_int64(e.block_hash)])
            msg.events.append(cpb.KvCacheEvent(event_id=i, removed=removed))
        else:
            msg.events.append(cpb.KvCacheEvent(event_id=i, cleared=cpb.KvCacheCleared()))
    return msg


def tokenizer_zip(model_dir: str) -> bytes:
    """The model directory's tokenizer, template and config files (no weights), as one zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(Path(model_dir).iterdir()):
            if path.is_file() and path.suffix in TOKENIZER_SUFFIXES and not path.name.endswith(".index.json"):
                zf.write(path, path.name)
    return buf.getvalue()
