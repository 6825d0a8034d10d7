"""vllm.grpc.engine <-> our dataclasses, without a server: vLLM's defaults, refusals, KV batches."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from scheduler_svc import vllm_convert as conv
from scheduler_svc.errors import InvalidRequest, Unsupported
from scheduler_svc.kv_events import BlockRemoved, BlockStored, CacheCleared, KvBatch
from scheduler_svc.prompts import Prompts
from scheduler_svc.request import Output
from scheduler_svc.sampling_params import Constraint, SamplingParams
from scheduler_svc.sequence import FinishReason


def test_unset_fields_take_vllms_defaults() -> None:
    p = conv.to_params(vpb.SamplingParams(), prompt_len=10, max_model_len=512)
    # skip_special_tokens: the proto's default, as vLLM's servicer takes it; the gateway always sets it
    assert p == SamplingParams(max_tokens=502, top_p=1.0, repetition_penalty=1.0, n=1, skip_special_tokens=False)
    p = conv.to_params(
        vpb.SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, seed=-1, logit_bias={7: 2.5, 3: -1.0}), 10, 512
    )
    assert (p.temperature, p.max_tokens, p.logprobs, p.seed) == (0.0, 5, 1, 2**64 - 1)
    assert p.logit_bias == ((3, -1.0), (7, 2.5))


def test_every_constraint_kind_is_carried() -> None:
    def constraint(**kind: object) -> Constraint | None:
        return conv.to_params(vpb.SamplingParams(**kind), 10, 512).constraint

    assert constraint() is None and constraint(json_object=False) is None
    assert constraint(json_schema="{}") == Constraint("json_schema", "{}")
    assert constraint(regex="a+") == Constraint("regex", "a+")
    assert constraint(grammar='root ::= "a"') == Constraint("grammar", 'root ::= "a"')
    assert constraint(structural_tag="{}") == Constraint("structural_tag", "{}")
    assert constraint(json_object=True) == Constraint("json_object")
    assert constraint(choice=vpb.ChoiceConstraint(choices=["a", "b"])) == Constraint("choice", ("a", "b"))
    with pytest.raises(InvalidRequest, match="at least one choice"):
        constraint(choice=vpb.ChoiceConstraint())


class FakePrompts:
    """Prompts' two entry points, telling which one ran: text (model-length bound) or tokenize (bytes only)."""

    async def text(self, text: str) -> list[int]:
        return [len(text), 1]

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(text), 2, int(add_special_tokens)]


def test_prompt_from_ids_or_text_and_truncation() -> None:
    fake = cast(Prompts, FakePrompts())
    req = vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[1, 2, 3, 4]))
    assert asyncio.run(conv.prompt_ids(req, fake)) == [1, 2, 3, 4]
    req.sampling_params.truncate_prompt_tokens = 2
    assert asyncio.run(conv.prompt_ids(req, fake)) == [3, 4]
    req = vpb.GenerateRequest(text="hi")
    assert asyncio.run(conv.prompt_ids(req, fake)) == [2, 1]
    req.sampling_params.truncate_prompt_tokens = 3  # tokenized whole, with special tokens, then cut
    assert asyncio.run(conv.prompt_ids(req, fake)) == [2, 2, 1]
    with pytest.raises(InvalidRequest, match="no input"):
        asyncio.run(conv.prompt_ids(vpb.GenerateRequest(), fake))


@pytest.mark.parametrize(
    ("req", "error", "words"),
    [
        (vpb.GenerateRequest(kv_transfer_params_json="{}"), Unsupported, "KV transfer"),
        (vpb.GenerateRequest(data_parallel_rank=1), InvalidRequest, "data_parallel_rank"),
        (vpb.GenerateRequest(media_refs=vpb.MediaRefs()), Unsupported, "multimodal"),
    ],
)
def test_unsupported_requests_are_refused(req, error, words) -> None:
    with pytest.raises(error, match=words):
        conv.check_supported(req)
    conv.check_supported(vpb.GenerateRequest(data_parallel_rank=0))  # rank 0 is this engine


def test_complete_names_the_stop_string_or_token() -> None:
    params = SamplingParams(stop=("END",), stop_token_ids=(9,))
    out = Output(1, [4, 9], finish_reason=FinishReason.STOP, stop_reason="9", prompt_tokens=3)
    done = conv.complete(out, params, num_top=0).complete
    assert (done.index, done.finish_reason, done.matched_token_id, done.prompt_tokens) == (1, "stop", 9, 3)
    out = Output(0, [4, 5], finish_reason=FinishReason.STOP, stop_reason="END")
    assert conv.complete(out, params, num_top=0).complete.matched_stop_str == "END"
    out = Output(0, [4, 2], finish_reason=FinishReason.STOP, stop_reason="2")  # EOS: no matched stop
    assert conv.complete(out, params, num_top=0).complete.WhichOneof("matched_stop") is None


def test_kv_batch_hashes_are_signed_and_events_numbered() -> None:
    big = 2**64 - 5
    batch = KvBatch(7, 1.5, (BlockStored(big, 11, (1, 2)), BlockRemoved(11), CacheCleared()))
    msg = conv.kv_batch(batch, block_size=2, first_event_id=40)
    assert (msg.sequence_number, msg.timestamp) == (7, 1.5)
    stored, removed, cleared = msg.events
    assert [e.event_id for e in msg.events] == [40, 41, 42]
    assert stored.stored.blocks[0].block_hash == -5 and stored.stored.parent_block_hash == 11
    assert list(stored.stored.blocks[0].token_ids) == [1, 2] and stored.stored.blocks[0].block_size == 2
    assert list(removed.removed.block_hashes) == [11] and cleared.HasField("cleared")
