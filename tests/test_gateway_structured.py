"""Structured output through the real SMG gateway's OpenAI API (issue 18), on the tiny random model:
`response_format` with a JSON schema, and tool calls read by the gateway's Qwen tool parser. Random
weights give noise, so every valid output is the constraint's doing; `jsonschema` checks them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from tests.gateway import Gateway
from tests.service import Service

MODEL = "tiny"
# Every value bounded, so that random weights finish the object within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for three days?"}]


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir) -> Iterator[OpenAI]:
    model_dir = tmp_path_factory.mktemp("gw-structured") / MODEL  # served under its directory's name
    model_dir.symlink_to(tiny_model_dir, target_is_directory=True)
    svc = Service(model_dir, num_kv_blocks=128, block_size=16)
    gw = Gateway([svc.addr], model_dir, model_dir.parent / "smg.log", "--tool-call-parser", "qwen")
    try:
        yield OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        gw.stop()
        svc.stop()


def twenty(fn) -> list:
    """fn(seed) for 20 seeds, all in flight at once."""
    with ThreadPoolExecutor(20) as pool:
        return list(pool.map(fn, range(20)))


def test_response_format_json_schema(api: OpenAI) -> None:
    def one(seed: int):
        return api.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}},
        ).choices[0]

    for choice in twenty(one):
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls(api: OpenAI, tool_choice) -> None:
    def one(seed: int):
        return api.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=450,
            temperature=1.0,
            seed=seed,
            tools=TOOLS,
            tool_choice=tool_choice,
        ).choices[0]

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for choice in twenty(one):
        calls = choice.message.tool_calls
        assert calls, choice
        for call in calls:
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_schema_that_does_not_compile_is_a_400(api: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="does not compile"):
        api.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=10,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
