"""No input can hurt the service: malformed bytes, random field values, huge prompts and tiny
temperatures get a clear status (or their mathematical meaning), no traceback is logged, and the
service goes on serving the same outputs with every KV block back."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import AsyncClient, Client
from proto import generate_pb2 as pb
from tests.faults import wait_for
from tests.service import Service

GENERATION = "/nanovllm.v1.Generation/"
VLLM = "/vllm.grpc.engine.VllmEngine/"
STREAMING = {"Generate"}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
PROMPT = [5, 6, 7, 8, 9, 10, 11]
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)


class Records(logging.Handler):
    """Every log record at WARNING or above, or carrying a traceback, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            self.bad.append(record)


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(tiny_model_dir, num_kv_blocks=128, block_size=16)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.addr) as ch:
        yield ch


def run_greedy(addr: str, temperature: float = 0.0) -> list[int]:
    with Client(addr) as c:
        return [
            t for m in c.generate(PROMPT, max_tokens=12, temperature=temperature, ignore_eos=True) for t in m.token_ids
        ]


@pytest.fixture(scope="module")
def greedy(service) -> list[int]:
    return run_greedy(service.addr)


@pytest.fixture
def records():
    handler = Records()
    logging.getLogger().addHandler(handler)
    yield handler.bad
    logging.getLogger().removeHandler(handler)


def call(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Sends raw bytes to `method` ("Generate", or "vllm:Generate" for the VllmEngine service); reads
    a stream's first messages only (their status is what counts), then cancels."""
    service, _, name = method.rpartition(":")
    path = (VLLM if service else GENERATION) + name
    try:
        if name in STREAMING:
            stream = channel.unary_stream(path)(data, timeout=30)
            for i, _ in enumerate(stream):
                if i == 2:
                    stream.cancel()
                    return grpc.StatusCode.OK
        else:
            channel.unary_unary(path)(data, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


floats = st.floats(width=32) | st.sampled_from([0.0, 1e-45, 1e-38, 1e-6, 0.5, 1.0, 2.0, 100.0])
uint32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 8)
sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": small | uint32,
        "temperature": floats,
        "top_p": floats,
        "top_k": st.integers(-(2**31), 2**31 - 1),
        "min_p": floats,
        "seed": st.integers(0, 2**64 - 1),
        "repetition_penalty": floats,
        "presence_penalty": floats,
        "frequency_penalty": floats,
        "stop": st.lists(st.text(max_size=300), max_size=20),
        "stop_token_ids": st.lists(uint32, max_size=4),
        "min_tokens": small | uint32,
        "ignore_eos": st.booleans(),
        "logprobs": small | uint32,
    },
)
chat = st.lists(st.builds(pb.ChatMessage, role=st.text(max_size=20), content=st.text(max_size=200)), max_size=4)
requests = st.builds(
    pb.GenerateRequest,
    request_id=st.text(max_size=10),
    sampling=sampling.map(lambda kw: pb.SamplingParams(**kw)),
) | st.one_of(
    st.builds(
        pb.GenerateRequest, text=st.text(max_size=200), sampling=sampling.map(lambda kw: pb.SamplingParams(**kw))
    ),
    st.builds(
        pb.GenerateRequest,
        token_ids=st.lists(uint32 | st.integers(0, 300), max_size=40).map(lambda ids: pb.TokenIds(ids=ids)),
        sampling=sampling.map(lambda kw: pb.SamplingParams(**kw)),
    ),
    st.builds(pb.GenerateRequest, chat=chat.map(lambda m: pb.ChatMessages(messages=m))),
)


def mutate(data: bytes, draw: st.DataObject) -> bytes:
    out = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        kind = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw.draw(st.integers(0, len(out)))
        if kind == "flip" and at < len(out):
            out[at] ^= draw.draw(st.integers(1, 255))
        elif kind == "cut":
            del out[at:]
        else:
            out[at:at] = draw.draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


def test_fuzzed_requests_get_a_clear_status_and_change_nothing(service, channel, greedy, records) -> None:
    seen: dict[grpc.StatusCode, int] = {}

    def check(method: str, data: bytes) -> None:
        code = call(channel, method, data)
        assert code in ALLOWED, (code, method, data)
        seen[code] = seen.get(code, 0) + 1

    @settings(FUZZ, max_examples=1500)
    @given(st.binary(max_size=300), st.sampled_from(["Generate", "Tokenize", "GetModelInfo"]))
    def random_bytes(data: bytes, method: str) -> None:
        check(method, data)

    # The gateway's service: a vllm GenerateRequest may also ask for what is not served (UNIMPLEMENTED).
    @settings(FUZZ, max_examples=400)
    @given(st.binary(max_size=300), st.sampled_from(["vllm:Generate", "vllm:Abort", "vllm:GetLoads"]))
    def random_vllm_bytes(data: bytes, method: str) -> None:
        code = call(channel, method, data)
        assert code in ALLOWED | {grpc.StatusCode.UNIMPLEMENTED}, (code, method, data)
        seen[code] = seen.get(code, 0) + 1

    @settings(FUZZ, max_examples=600)
    @given(requests)
    def random_fields(req: pb.GenerateRequest) -> None:
        check("Generate", req.SerializeToString())

    @settings(FUZZ, max_examples=900)
    @given(requests, st.data())
    def mutated_bytes(req: pb.GenerateRequest, data: st.DataObject) -> None:
        check("Generate", mutate(req.SerializeToString(), data))

    random_bytes()
    random_vllm_bytes()
    random_fields()
    mutated_bytes()
    assert sum(seen.values()) == 3400 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 500, seen
    assert not records, [r.getMessage() for r in records]
    sched = service.engine.core.scheduler
    wait_for("every KV block free", lambda: sched.blocks.num_free == 128 and not sched.running, 10)
    with Client(service.addr) as c:
        assert [
            t for m in c.generate(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True) for t in m.token_ids
        ] == greedy


def test_bytes_that_do_not_parse_are_invalid_argument_on_the_vllm_service_too(channel, records) -> None:
    truncated = b"\x0a\xff"  # field 1, length-delimited: 255 bytes announced, none sent
    for method in ("Generate", "vllm:Generate", "vllm:Abort", "vllm:GetModelInfo", "vllm:GetLoads"):
        assert call(channel, method, truncated) == grpc.StatusCode.INVALID_ARGUMENT, method
    assert not records, [r.getMessage() for r in records]


def test_a_string_that_is_not_utf8_is_invalid_argument(channel, records) -> None:
    text_field = b"\x12\x02\xff\xfe"  # GenerateRequest.text (field 2, length-delimited): two bytes of no UTF-8
    with pytest.raises(grpc.RpcError) as err:
        list(channel.unary_stream(GENERATION + "Generate")(text_field, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in err.value.details() and "\n" not in err.value.details()
    assert not records, [r.getMessage() for r in records]


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-9, 1e-6])
def test_tiny_temperatures_are_greedy(service, greedy, temperature) -> None:
    assert run_greedy(service.addr, temperature) == greedy


def test_prompt_bytes_are_limited_before_tokenizing(service) -> None:
    big = "x" * ((1 << 20) + 1)
    with Client(service.addr) as c:
        for kwargs in ({"prompt": big}, {"messages": [{"role": "user", "content": big}]}):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(c.generate(**kwargs, max_tokens=1))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "--max-prompt-bytes" in err.value.details()
            assert time.monotonic() - start < 1.0  # refused, not tokenized


def test_a_huge_prompt_being_tokenized_does_not_stall_other_streams(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, scheduler={"max_prompt_bytes": 8 << 20}, num_kv_blocks=128, block_size=16)
    huge = ("The quick brown fox jumps over the lazy dog. " * 90_000)[:4_000_000]
    gaps: list[float] = []

    async def main() -> grpc.StatusCode:
        async with AsyncClient(svc.addr) as client:

            async def big() -> grpc.StatusCode:
                try:
                    async for _ in client.generate(huge, max_tokens=1):
                        pass
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            start = time.perf_counter()
            task = asyncio.create_task(big())
            while not task.done():  # short greedy streams, one after another, while it is tokenized
                last = None
                async for _ in client.generate(PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now - last, now - start))
                    last = now
            return await task

    try:
        code = asyncio.run(main())
    finally:
        svc.stop()
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # tokenized, then too long for the model
    # Tokenized on the event loop, it stalled every stream for seconds at once. The bound is 100 ms; on
    # a CPU shared with other jobs a rare gap passes it whatever this process does, so 1% may.
    slow = [g for g, _ in gaps if g > 0.1]
    assert len(gaps) > 100 and len(slow) <= len(gaps) // 100 and max(gaps)[0] < 1.0, (len(gaps), sorted(gaps)[-5:])
