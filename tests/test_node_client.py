"""The Node.js client (client/node, @grpc/grpc-js) streams a generation from a running server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from client import Client
from tests.service import Service

NODE_DIR = Path(__file__).resolve().parents[1] / "client" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if os.environ.get("CI"):
            pytest.fail("node or client/node/node_modules is missing: .ci/run installs them")
        pytest.skip("needs node and `npm ci` in client/node")
    return exe


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(tiny_model_dir, num_kv_blocks=64, block_size=16)
    yield svc
    svc.stop()


def run(node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(NODE_DIR / "generate.js"), *args], capture_output=True, text=True, timeout=60)


def test_node_streams_the_same_text_as_python(node, service) -> None:
    with Client(service.addr) as c:
        want = "".join(
            m.text for m in c.generate("The quick brown fox", max_tokens=12, temperature=0.0, ignore_eos=True)
        )
    out = run(
        node,
        "--addr",
        service.addr,
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    assert "[length: " in out.stderr and "12 completion tokens]" in out.stderr


def test_node_json_messages_and_chat(node, service) -> None:
    out = run(node, "--addr", service.addr, "--chat", "Hello", "--system", "Be terse.", "--max-tokens", "5", "--json")
    assert out.returncode == 0, out.stderr
    msgs = [json.loads(line) for line in out.stdout.splitlines()]
    assert sum(len(m["token_ids"]) for m in msgs) <= 5
    assert msgs[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert msgs[-1]["usage"]["prompt_tokens"] > 5  # the template's tokens around two messages


def test_node_reports_grpc_errors(node, service) -> None:
    out = run(node, "--addr", service.addr, "--prompt", "hi", "--temperature=-1")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "temperature" in out.stderr


def test_node_sends_a_constraint(node, service) -> None:
    regex = "[a-z]{2,4}-[0-9]"
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--max-tokens", "30", "--seed", "3", "--regex", regex)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(regex, out.stdout.strip()), out.stdout
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--choice", "yes", "--choice", "no")
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stdout + out.stderr
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--regex", "a", "--choice", "b")
    assert out.returncode == 2 and "at most one constraint" in out.stderr
