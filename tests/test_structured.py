"""Structured output end to end over gRPC on the tiny random model, checked by independent validators
(jsonschema, Python's re and json): random weights give noise, so a valid output is the grammar's doing."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable

import grpc
import jsonschema
import pytest

from client import Client
from client.types import Output
from tests.service import Service
from tests.test_e2e import collect, make_prompts, run_concurrently

SCHEMA = {
    "type": "object",
    "properties": {
        # Bounded by a pattern, not maxLength: xgrammar 0.2.9 lets control characters into a
        # maxLength string, which JSON forbids (its plain string rule keeps them out).
        "name": {"type": "string", "pattern": "^[A-Za-z][a-z ]{0,7}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,4}$"}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "role"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
EBNF = 'root ::= "[" item ("," item){0,3} "]"\nitem ::= "true" | "false" | [1-9] [0-9]{0,2}'
CHOICES = ["red", "green", "blue sky", "ünïcode"]
TOOL = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}
TAG = {
    "type": "structural_tag",
    "format": {
        "type": "tag",
        "begin": "<tool>",
        "content": {"type": "json_schema", "json_schema": TOOL},
        "end": "</tool>",
    },
}


def valid_ebnf(text: str) -> bool:
    items = json.loads(text)
    ok = all(type(x) is bool or (type(x) is int and 1 <= x <= 999) for x in items)
    return ok and 1 <= len(items) <= 4 and json.dumps(items, separators=(",", ":")) == text


def valid_tag(text: str) -> bool:
    assert text.startswith("<tool>") and text.endswith("</tool>"), text
    jsonschema.validate(json.loads(text[len("<tool>") : -len("</tool>")]), TOOL)
    return True


# kind: (the request's constraint fields, a validator of the whole output text)
KINDS = {
    "json_schema": ({"json_schema": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    "regex": ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) is not None),
    "grammar": ({"grammar": EBNF}, valid_ebnf),
    "choice": ({"choice": CHOICES}, lambda t: t in CHOICES),
    "json_object": ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    "structural_tag": ({"structural_tag": json.dumps(TAG)}, valid_tag),
}


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(tiny_model_dir, num_kv_blocks=256, block_size=16)
    yield svc
    svc.stop()


def generate(addr: str, prompt, **kw) -> tuple[list[int], str, Output]:
    with Client(addr) as c:
        ids, text, msgs = collect(c, prompt, timeout=120, **kw)
    return ids, text, msgs[-1]


def in_threads(fn: Callable[[int], None], n: int) -> None:
    """fn(0) .. fn(n - 1) at once, each on its own thread, so that they share steps."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_sampled_output_is_valid(service, kind) -> None:
    fields, valid = KINDS[kind]
    prompts = make_prompts(300, 20, seed=len(kind))
    results: dict[int, tuple] = {}

    def one(i: int) -> None:
        results[i] = generate(service.addr, prompts[i], max_tokens=300, temperature=1.0, seed=i, **fields)

    in_threads(one, 20)
    assert len(results) == 20
    finished = [text for _, text, last in results.values() if last.finish_reason == "stop"]
    # Any JSON object has free-form keys and strings, which random weights may not close within
    # max_tokens; every other kind here bounds its output.
    assert len(finished) >= (10 if kind == "json_object" else 20), [t for _, t, _ in results.values()]
    for text in finished:
        assert valid(text), text


def test_greedy_constrained_output_is_the_same_alone_batched_preempted_and_chunked(tiny_model_dir, service) -> None:
    prompts = make_prompts(300, 6, seed=7, lo=40, hi=60)
    schema = {"json_schema": json.dumps(SCHEMA)}
    alone = [generate(service.addr, p, max_tokens=120, temperature=0.0, **schema)[0] for p in prompts]
    assert all(len(ids) > 8 for ids in alone)
    assert run_concurrently(service.addr, prompts, max_tokens=120, temperature=0.0, **schema) == alone

    tight = Service(tiny_model_dir, num_kv_blocks=64, block_size=4)  # too few blocks for six at once
    try:
        assert run_concurrently(tight.addr, prompts, max_tokens=120, temperature=0.0, **schema) == alone
        assert tight.engine.core.scheduler.num_preemptions > 0
    finally:
        tight.stop()
    chunked = Service(tiny_model_dir, scheduler={"max_num_batched_tokens": 16}, num_kv_blocks=256, block_size=16)
    try:
        assert run_concurrently(chunked.addr, prompts, max_tokens=120, temperature=0.0, **schema) == alone
    finally:
        chunked.stop()


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(service) -> None:
    plain = make_prompts(300, 4, seed=3)
    settings = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 5}] * 2
    alone = [
        generate(service.addr, p, max_tokens=40, ignore_eos=True, **s)[0] for p, s in zip(plain, settings, strict=True)
    ]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        if i < len(plain):
            results[i] = generate(service.addr, plain[i], max_tokens=40, ignore_eos=True, **settings[i])[0]
        else:
            generate(service.addr, "Hello", max_tokens=100, temperature=1.0, seed=i, json_schema=json.dumps(SCHEMA))

    in_threads(one, len(plain) + 6)
    assert [results[i] for i in range(len(plain))] == alone


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"regex": "a(b"}, "parenthesis is not closed"),
        ({"json_schema": "{not json"}, "JSON"),
        ({"json_schema": '{"type": "nope"}'}, 'Unsupported type "nope"'),
        ({"grammar": "root ::= missing"}, 'Rule "missing" is not defined'),
        ({"structural_tag": '{"type": "structural_tag", "format": {"type": "bogus"}}'}, "bogus"),
        ({"choice": ["yes", ""]}, "no empty one"),
        ({"regex": "[a-z]+", "min_tokens": 2}, "min_tokens"),
    ],
)
def test_a_constraint_that_does_not_compile_is_invalid_argument(service, fields, needle) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(service.addr, "Hello", **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details() and "\n" not in err.value.details()
    assert generate(service.addr, "Hello", max_tokens=4, regex="[0-9]{4}")[1].isdigit()  # still serving


def test_structured_output_with_the_core_in_its_own_process(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, scheduler={"core_process": True}, num_kv_blocks=256, block_size=16)
    try:
        _, text, last = generate(svc.addr, "Hello", max_tokens=300, seed=1, json_schema=json.dumps(SCHEMA))
        assert last.finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
        with pytest.raises(grpc.RpcError) as err:
            generate(svc.addr, "Hello", regex="a(b")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        svc.stop()
