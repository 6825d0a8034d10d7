"""The CLI as a user runs it: `nanovllm serve` in one process, `nanovllm generate` in another."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
from transformers import AutoTokenizer

from tests.polling import free_port, wait_until

pytestmark = pytest.mark.slow  # a `nanovllm serve` process and a `nanovllm generate` process per test


def nanovllm() -> list[str]:
    exe = shutil.which("nanovllm")
    if exe is None:
        pytest.fail("the nanovllm console script is not installed: run `pip install -e .`")
    return [exe]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = nanovllm() + ["serve", "--model", str(tiny_model_dir), "--port", str(port), "--device", "cpu"]
    cmd += ["--num-kvcache-blocks", "128", "--log-interval", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line and str(port) in line:
            break
    else:
        proc.kill()
    assert proc.poll() is None, "".join(lines)
    # Keep reading: the status lines land in `lines`, and a full pipe would block the server.
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    yield f"127.0.0.1:{port}", proc, lines
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_generate_streams_text(server, tiny_model_dir) -> None:
    addr, *_ = server
    out = subprocess.run(
        nanovllm()
        + ["generate", "--addr", addr, "--prompt", "The quick brown", "--max-tokens", "8"]
        + ["--temperature", "0", "--ignore-eos"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() != ""


def test_generate_json_matches_text_and_token_ids(server, tiny_model_dir) -> None:
    addr, *_ = server
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = subprocess.run(
        nanovllm()
        + ["generate", "--addr", addr, "--prompt-token-ids", "5,6,7,8", "--max-tokens", "6"]
        + ["--temperature", "0", "--ignore-eos", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    msgs = [json.loads(line) for line in out.stdout.splitlines()]
    ids = [t for m in msgs for t in m["token_ids"]]
    assert len(ids) == 6
    assert "".join(m["text"] for m in msgs) == tok.decode(ids, skip_special_tokens=True)
    assert msgs[-1]["finish_reason"] == "length" and all(m["finish_reason"] is None for m in msgs[:-1])


def test_generate_reports_bad_input(server) -> None:
    addr, *_ = server
    out = subprocess.run(
        nanovllm() + ["generate", "--addr", addr, "--prompt", "hi", "--temperature", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "temperature" in out.stderr


def test_generate_with_a_constraint(server) -> None:
    addr, *_ = server
    for flags, valid in (
        (["--regex", "[0-9]{3}-[a-z]{2}"], lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        (["--choice", "yes", "no"], lambda t: t in ("yes", "no")),
    ):
        out = subprocess.run(
            nanovllm() + ["generate", "--addr", addr, "--prompt", "Hi", "--max-tokens", "40", "--seed", "1", *flags],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert valid(out.stdout.strip()), out.stdout


def test_status_line_while_busy(server) -> None:
    addr, _, lines = server
    subprocess.run(
        nanovllm() + ["generate", "--addr", addr, "--prompt-token-ids", "5,6,7", "--max-tokens", "200", "--ignore-eos"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    line = wait_until(
        lambda: next((line for line in lines if "generation throughput" in line), None), lambda: "".join(lines)
    )
    assert "Running:" in line and "Waiting:" in line and "KV cache usage:" in line


def test_generate_chat_and_health(server) -> None:
    addr, *_ = server
    out = subprocess.run(
        nanovllm()
        + ["generate", "--addr", addr, "--chat", "Hi", "--system", "Be terse.", "--max-tokens", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1])["usage"]["prompt_tokens"] > 5  # the template's own tokens
    health = subprocess.run(nanovllm() + ["health", "--addr", addr], capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"


def test_sigterm_stops_everything(server, tiny_model_dir) -> None:
    _, proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    def workers() -> list[str]:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        return [line for line in ps.splitlines() if "worker_svc" in line and str(tiny_model_dir) in line]

    wait_until(lambda: not workers(), lambda: f"its worker processes are still running: {workers()}")
