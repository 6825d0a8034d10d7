"""The vllm.grpc.engine.VllmEngine service called directly, as a gateway calls it: same tokens as
nanovllm.v1, the message shapes SMG reads, clear refusals, Abort, FlushCache and the tokenizer bundle."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import zipfile
from collections.abc import Iterator

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg
from transformers import AutoTokenizer

from client import Client
from tests.kv_subscriber import KvSubscriber
from tests.service import Service

PROMPT = [5, 17, 40, 99, 230, 12, 7, 64, 81, 150]


@pytest.fixture(scope="module")
def service(tiny_model_dir) -> Iterator[Service]:
    svc = Service(tiny_model_dir, num_kv_blocks=64, block_size=16)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service) -> Iterator[vpbg.VllmEngineStub]:
    with grpc.insecure_channel(service.addr) as ch:
        yield vpbg.VllmEngineStub(ch)


def request(prompt: list[int] = PROMPT, stream: bool = True, request_id: str = "r", **sampling) -> vpb.GenerateRequest:
    return vpb.GenerateRequest(
        request_id=request_id,
        tokenized=vpb.TokenizedInput(input_ids=prompt),
        sampling_params=vpb.SamplingParams(**sampling),
        stream=stream,
    )


def ours(service: Service, prompt: list[int], **kwargs) -> list[int]:
    with Client(service.addr) as c:
        return [t for m in c.generate(prompt, **kwargs) for t in m.token_ids]


def test_streamed_chunks_then_complete_carry_our_tokens(service, stub) -> None:
    want = ours(service, PROMPT, max_tokens=9, temperature=0.0, ignore_eos=True)
    msgs = list(stub.Generate(request(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2)))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    assert [t for c in chunks for t in c.token_ids] == want
    assert msgs[-1].HasField("complete") and sum(m.HasField("complete") for m in msgs) == 1
    done = msgs[-1].complete
    assert (done.finish_reason, done.prompt_tokens, done.index) == ("length", len(PROMPT), 0)
    assert list(done.output_ids) == list(chunks[-1].token_ids)  # streaming: the last delta
    lp = [x for c in chunks for x in c.output_logprobs.token_ids]
    assert lp == want and all(len(t.values) == 2 for c in chunks for t in c.output_logprobs.top_logprobs)


def test_unary_n_samples_and_stop_token(service, stub) -> None:
    greedy = ours(service, PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True)
    msgs = list(stub.Generate(request(stream=False, max_tokens=6, temperature=0.0, ignore_eos=True, n=2)))
    assert sorted(m.complete.index for m in msgs) == [0, 1]
    assert all(list(m.complete.output_ids) == greedy for m in msgs)
    stop = greedy[2]
    (m,) = stub.Generate(request(stream=False, max_tokens=6, temperature=0.0, ignore_eos=True, stop_token_ids=[stop]))
    assert m.complete.finish_reason == "stop" and m.complete.matched_token_id == stop
    assert list(m.complete.output_ids) == greedy[: greedy.index(stop) + 1]


def test_a_constraint_shapes_every_token(stub, tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (m,) = stub.Generate(request(stream=False, max_tokens=20, temperature=1.0, seed=3, regex="[0-9]{3}-[a-z]{2}"))
    assert m.complete.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", tok.decode(m.complete.output_ids, skip_special_tokens=True))


def test_logit_bias_steers_every_token(stub) -> None:
    (m,) = stub.Generate(request(stream=False, max_tokens=5, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0}))
    assert list(m.complete.output_ids) == [42] * 5


@pytest.mark.parametrize(
    ("req", "code", "words"),
    [
        (request(json_schema='{"type": "nope"}'), grpc.StatusCode.INVALID_ARGUMENT, "does not compile"),
        (request(prompt_logprobs=1), grpc.StatusCode.INVALID_ARGUMENT, "prompt_logprobs"),
        (request(logprobs=-1), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
        (request(n=99), grpc.StatusCode.INVALID_ARGUMENT, "sampling.n"),
        (request(logit_bias={10**6: 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "logit_bias"),
        (request(max_tokens=600), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
        (
            vpb.GenerateRequest(
                request_id="x",
                tokenized=vpb.TokenizedInput(input_ids=PROMPT),
                mm_inputs=vpb.MultimodalInputs(im_token_id=3),
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "multimodal",
        ),
    ],
)
def test_unsupported_fields_are_refused_clearly(stub, req, code, words) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == code and words in e.value.details()
    (m,) = stub.Generate(request(stream=False, max_tokens=2))  # and the service keeps serving
    assert m.complete.completion_tokens == 2


def test_embed_is_unimplemented(stub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(vpb.EmbedRequest(request_id="e", tokenized=vpb.TokenizedInput(input_ids=PROMPT)))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "embeddings" in e.value.details()


def test_abort_by_request_id_ends_the_stream(service, stub) -> None:
    stream = stub.Generate(request(request_id="long", max_tokens=400, temperature=0.0, ignore_eos=True))
    first = next(stream)  # running now
    assert first.HasField("chunk")
    got: list[vpb.GenerateResponse] = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    stub.Abort(vpb.AbortRequest(request_ids=["long", "unknown"]))
    reader.join(timeout=30)
    assert got[-1].complete.finish_reason == "abort"
    assert 1 + sum(len(m.chunk.token_ids) for m in got if m.HasField("chunk")) < 400
    assert not service.engine.requests and not service.engine.by_request_id


def test_flush_cache_clears_blocks_and_tells_subscribers(service, stub) -> None:
    sub = KvSubscriber(service.addr)
    try:
        list(stub.Generate(request(prompt=list(range(3, 40)), max_tokens=2)))
        assert service.call(cached_count(service))  # two full prompt blocks are cached
        res = stub.FlushCache(cpb.FlushCacheRequest(timeout_s=5))
        assert res.success, res.message
        assert service.call(cached_count(service)) == 0
        sub.wait_for({})
    finally:
        sub.close()


async def cached_count(service: Service) -> int:
    return len(service.engine.core.scheduler.blocks.cached)


def test_info_loads_health_and_tokenizer(service, stub, tiny_model_dir) -> None:
    info = stub.GetModelInfo(vpb.GetModelInfoRequest())
    assert info.served_model_name == tiny_model_dir.name and info.is_generation
    assert info.max_context_length == service.engine.info.max_model_len and info.vocab_size == 400
    assert list(info.eos_token_ids) == sorted(service.engine.eos_token_ids)
    server = stub.GetServerInfo(vpb.GetServerInfoRequest())
    assert server.block_size == 16 and server.data_parallel_size == 1
    (load,) = stub.GetLoads(vpb.GetLoadsRequest()).loads
    assert load.max_total_num_tokens == 64 * 16 and 0.0 <= load.token_usage <= 1.0
    assert stub.HealthCheck(vpb.HealthCheckRequest()).healthy
    chunks = list(stub.GetTokenizer(cpb.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".safetensors") for n in names)


def test_samples_kv_events_and_flush_through_the_core_process(tiny_model_dir) -> None:
    """The same over the core's own process: Add with a leader, StepOutputs with KV events, Flush."""
    svc = Service(tiny_model_dir, scheduler={"core_process": True}, num_kv_blocks=64, block_size=16)
    sub = KvSubscriber(svc.addr)
    try:
        with grpc.insecure_channel(svc.addr) as ch:
            stub = vpbg.VllmEngineStub(ch)
            prompt = list(range(3, 40))  # two full blocks
            msgs = list(stub.Generate(request(prompt=prompt, stream=False, max_tokens=3, n=2, temperature=0.0)))
            assert sorted(m.complete.index for m in msgs) == [0, 1]
            assert sorted(m.complete.cached_tokens for m in msgs) == [0, 32]  # the second shared the first's
            deadline = time.monotonic() + 10
            while len(sub.blocks()) < 2:
                assert time.monotonic() < deadline, sub.blocks()
                time.sleep(0.02)
            assert [tokens for _, tokens in sub.blocks().values()] == [tuple(prompt[:16]), tuple(prompt[16:32])]
            assert stub.FlushCache(cpb.FlushCacheRequest(timeout_s=5)).success
            sub.wait_for({})
    finally:
        sub.close()
        svc.stop()
