"""The Node.js client (client/node, @grpc/grpc-js) streams a generation from a running server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import Client
from tests.service import Service

pytestmark = pytest.mark.slow  # a node process per test

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
    assert msgs[-1]["finish_reason"] in ("stop", "length")
    assert msgs[-1]["usage"]["prompt_tokens"] > 5  # the template's tokens around two messages


def test_node_reports_grpc_errors(node, service) -> None:
    out = run(node, "--addr", service.addr, "--prompt", "hi", "--temperature=-1")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "temperature" in out.stderr


def python_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", *args], capture_output=True, text=True, timeout=60
    )


def json_lines(out: subprocess.CompletedProcess) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_node_json_and_flags_match_the_python_cli(node, service) -> None:
    """--logprobs, --stop-token-ids (several values, as `nanovllm generate` takes them) and --min-tokens reach
    the server, and each --json line is the object `nanovllm generate --json` prints."""
    with Client(service.addr) as c:
        ids = [t for m in c.generate([5, 6, 7], max_tokens=12, temperature=0.0, ignore_eos=True) for t in m.token_ids]
    # A stop token greedy decoding reaches first at step 3 or later: --min-tokens 3 cannot change the text before it.
    at = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    unused = next(t for t in range(300, 400) if t not in ids)  # a second stop token that never comes
    args = ["--addr", service.addr, "--prompt-token-ids", "5,6,7", "--max-tokens", "12", "--temperature", "0"]
    args += ["--logprobs", "2", "--min-tokens", "3", "--stop-token-ids", str(ids[at]), str(unused), "--json"]
    want = json_lines(python_cli(*args))
    got = json_lines(run(node, *args))
    assert got == want
    assert [t for m in got for t in m["token_ids"]] == ids[: at + 1]
    assert got[-1]["finish_reason"] == "stop" and got[-1]["usage"]["completion_tokens"] == at + 1
    assert all(len(lp["top"]) == 2 for m in got for lp in m["logprobs"])
    assert all("usage" not in m and m["finish_reason"] is None for m in got[:-1])


def test_node_sends_a_64_bit_seed_exactly(node, service) -> None:
    args = ["--addr", service.addr, "--prompt", "The quick", "--max-tokens", "8", "--temperature", "1.5"]
    args += ["--seed", str(2**64 - 1), "--ignore-eos", "--json"]
    want = json_lines(python_cli(*args))
    assert json_lines(run(node, *args)) == want
    other = json_lines(run(node, *args[:-4], "--seed", str(2**64 - 2), "--ignore-eos", "--json"))
    assert [m["token_ids"] for m in other] != [m["token_ids"] for m in want]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-tokens", "4294967297"),  # 2**32 + 1 would wrap to one token
        ("--max-tokens", "-1"),
        ("--max-tokens", "1.5"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
        ("--logprobs", "-1"),
        ("--min-tokens", "x"),
        ("--top-k", str(2**31)),
        ("--prompt-token-ids", "a,b"),
        ("--stop-token-ids", "4294967296"),
        ("--temperature", "abc"),
        ("--timeout", "0"),
    ],
)
def test_node_rejects_values_the_api_cannot_carry(node, flag: str, value: str) -> None:
    source = [] if flag == "--prompt-token-ids" else ["--prompt", "hi"]
    out = run(node, "--addr", "127.0.0.1:1", *source, flag, value)  # refused before it connects
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f"nanovllm: {flag} must be "), out.stderr
    assert json.dumps(value) in out.stderr


def test_node_takes_the_python_clis_generate_flags(node) -> None:
    """Those it leaves out are connection details: system-root TLS, a server-name override, waiting for a server."""
    flags = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    python_help = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "--help"], capture_output=True, text=True, timeout=60
    )
    node_help = run(node, "--help")
    assert python_help.returncode == 0 and node_help.returncode == 0, python_help.stderr + node_help.stderr
    missing = set(flags.findall(python_help.stdout)) - set(flags.findall(node_help.stdout))
    assert missing == {"--tls", "--tls-server-name", "--wait"}


def test_node_sends_a_constraint(node, service) -> None:
    regex = "[a-z]{2,4}-[0-9]"
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--max-tokens", "30", "--seed", "3", "--regex", regex)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(regex, out.stdout.strip()), out.stdout
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--choice", "yes", "--choice", "no")
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stdout + out.stderr
    out = run(node, "--addr", service.addr, "--prompt", "Hi", "--regex", "a", "--choice", "b")
    assert out.returncode == 2 and "at most one constraint" in out.stderr
