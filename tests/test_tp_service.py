"""Tensor parallelism through the service on CPU: TP=2 over gloo streams the tokens TP=1 does, a dead
rank held past the recovery timeout turns into UNAVAILABLE for clients, `nanovllm serve` restarts
the whole group when a rank dies and its requests resume, and a TP size the heads do not divide
fails at start. Every process runs for real: `nanovllm serve`, or `python -m worker_svc` ranks plus
`python -m scheduler_svc --workers a,b`, with the tiny random Qwen3 (4 heads, 2 KV heads)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import jsonschema
import pytest

from client import Client
from tests import test_structured
from tests.polling import free_port, wait_until

pytestmark = pytest.mark.slow  # TP groups of real processes over gloo

MAX_TOKENS = 16
# Different lengths, sent at once so they share steps; the long one needs several prefill chunks of
# the 64-token budget, so chunks and decodes mix in one batch.
PROMPTS: list[str | list[int]] = [
    [5, 6, 7],
    "The quick brown fox jumps over the lazy dog.",
    list(range(40, 380, 3)),
    "Paged attention stores keys",
]
# Both servers the same: batch shape and prefix caching may differ with timing, the tokens may not.
SETTINGS = ["--num-kvcache-blocks", "128", "--max-num-batched-tokens", "64"]
RECOVERY_TIMEOUT_S = 2.0  # the separate group's scheduler holds requests this long for a lost rank
KILL_NOTICED_S = RECOVERY_TIMEOUT_S + 5.0  # how soon a client must hear of a killed rank


class Proc:
    """A child process in its own session, its output collected on a thread (a full pipe would stall it)."""

    def __init__(self, cmd: list[str]) -> None:
        self.popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        self.lines.extend(self.popen.stdout)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        def seen() -> bool:
            assert self.popen.poll() is None, f"exited with {self.popen.returncode} before {text!r}:\n{self.output}"
            return self.said(text)

        wait_until(seen, lambda: f"no {text!r}:\n{self.output}", timeout, every=0.05)

    def kill(self) -> None:
        """SIGKILL to its whole session: `nanovllm serve`'s workers go too, and so does a rank blocked
        in a gloo collective with a dead peer, which would ignore SIGTERM."""
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._reader.join(timeout=10)  # the last lines, once every writer of the pipe is gone


def nanovllm_serve(model_dir: Path, port: int, tp: int) -> Proc:
    exe = shutil.which("nanovllm")
    if exe is None:
        pytest.fail("the nanovllm console script is not installed: run `pip install -e .`")
    cmd = [exe, "serve", "--model", str(model_dir), "--device", "cpu", "--port", str(port), "--log-interval", "0"]
    return Proc([*cmd, "--tensor-parallel-size", str(tp), *SETTINGS])


def greedy(addr: str) -> list[list[int]]:
    """Greedy token ids of every prompt, all requests in flight at once."""

    def one(client: Client, prompt: str | list[int]) -> list[int]:
        stream = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, timeout=60)
        return [t for msg in stream for t in msg.token_ids]

    with Client(addr) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: one(client, p), PROMPTS))


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path) -> Iterator[list[tuple[str, Proc]]]:
    """`nanovllm serve` at TP=1 and at TP=2, started together; their addresses and processes."""
    ports = free_port(), free_port()
    procs = [nanovllm_serve(tiny_model_dir, port, tp) for port, tp in zip(ports, (1, 2), strict=True)]
    try:
        for proc, port in zip(procs, ports, strict=True):
            proc.wait_for(f"ready on 127.0.0.1:{port}")
        yield [(f"127.0.0.1:{port}", proc) for port, proc in zip(ports, procs, strict=True)]
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture(scope="module")
def reference(servers: list[tuple[str, Proc]]) -> list[list[int]]:
    """TP=1's greedy outputs."""
    out = greedy(servers[0][0])
    assert [len(ids) for ids in out] == [MAX_TOKENS] * len(PROMPTS)
    return out


@dataclass
class Group:
    """TP=2 ranks as separate processes and their scheduler, as compose runs them."""

    ranks: list[Proc]
    scheduler: Proc
    addr: str


@pytest.fixture
def group(tiny_model_dir: Path) -> Iterator[Group]:
    dist_port, port = free_port(), free_port()
    worker_ports = [free_port() for _ in range(2)]
    ranks = [
        Proc(
            [sys.executable, "-m", "worker_svc", "--model", str(tiny_model_dir), "--device", "cpu"]
            + ["--port", str(wport), "--rank", str(rank), "--tensor-parallel-size", "2", "--dist-port", str(dist_port)]
            + SETTINGS
        )
        for rank, wport in enumerate(worker_ports)
    ]
    workers = ",".join(f"127.0.0.1:{p}" for p in worker_ports)
    # One step on the wire at a time: once a client has the last token of the last request, the most in flight is
    # the step that tells the ranks to drop the finished sequences (with more, real steps sent ahead may be too).
    scheduler = Proc(
        [sys.executable, "-m", "scheduler_svc", "--model", str(tiny_model_dir), "--port", str(port)]
        + ["--workers", workers, "--log-interval", "0", "--max-inflight-steps", "1"]
        + ["--worker-recovery-timeout", str(RECOVERY_TIMEOUT_S), *SETTINGS[2:]]
    )
    try:
        scheduler.wait_for(f"ready on 127.0.0.1:{port}")
        yield Group(ranks, scheduler, f"127.0.0.1:{port}")
    finally:
        for proc in [*ranks, scheduler]:
            proc.kill()


def assert_unavailable(err: pytest.ExceptionInfo[grpc.RpcError], since: float) -> None:
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "not back within" in err.value.details(), err.value.details()
    assert time.monotonic() - since < KILL_NOTICED_S


def assert_scheduler_waits_for_its_workers(group: Group) -> None:
    """New requests fail at once while the group stays away, and the scheduler stays up for it."""
    with Client(group.addr) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate([5, 6, 7], max_tokens=4, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert group.scheduler.popen.poll() is None, group.scheduler.output


def test_serve_tp2_matches_tp1(servers: list[tuple[str, Proc]], reference: list[list[int]]) -> None:
    assert greedy(servers[1][0]) == reference


def test_serve_restarts_the_whole_group_when_a_rank_dies(
    servers: list[tuple[str, Proc]], reference: list[list[int]]
) -> None:
    """Rank 0 cannot go on without its peer: serve restarts both ranks and the requests resume."""
    addr, serve = servers[1]
    (rank1,) = [int(m[1]) for line in serve.lines if (m := re.search(r"worker rank 1 ready .*\(pid (\d+)\)", line))]
    with ThreadPoolExecutor(1) as pool:
        out = pool.submit(greedy, addr)
        os.kill(rank1, signal.SIGKILL)
        assert out.result(timeout=120) == reference
    assert "restarting the workers" in serve.output and "the worker group is back" in serve.output, serve.output


def test_rank_killed_mid_stream_ends_it_with_unavailable(group: Group) -> None:
    """Rank 1 answers nothing: only the scheduler's watch on its stream can notice it die."""
    with Client(group.addr) as client:
        stream = client.generate([5, 6, 7], max_tokens=480, temperature=0.0, ignore_eos=True, timeout=60)
        streamed = 0
        for msg in stream:
            streamed += len(msg.token_ids)
            if streamed >= 4:
                break
        group.ranks[1].kill()
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for msg in stream:
                streamed += len(msg.token_ids)
        assert streamed < 480
        assert_unavailable(err, killed)
    assert_scheduler_waits_for_its_workers(group)
    # Rank 0's collective failed with its peer gone: it exits, for its supervisor to restart the group.
    assert group.ranks[0].popen.wait(timeout=10) == 1, group.ranks[0].output


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_dead_while_idle_fails_the_next_request(group: Group, rank: int, reference: list[list[int]]) -> None:
    """Every rank's stream is watched while idle too: the request is held for the lost rank, then fails."""
    assert greedy(group.addr) == reference  # separate rank processes give TP=1's tokens too
    group.ranks[rank].kill()  # returns once the process is gone: by then the engine is idle (see `group`)
    if rank == 1:  # the scheduler's watch on rank 1's stream sees it end
        wait_until(lambda: group.scheduler.said("worker rank 1"), lambda: group.scheduler.output)
    asked = time.monotonic()
    with Client(group.addr) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate([5, 6, 7], max_tokens=4, timeout=30))
    assert_unavailable(err, asked)
    assert_scheduler_waits_for_its_workers(group)
    # Its peer cannot rejoin a group with a new rank: dropped by the scheduler, it exits to restart too.
    peer = group.ranks[1 - rank]
    assert peer.popen.wait(timeout=10) == 1, peer.output


def test_worker_rejects_tp_size_not_dividing_heads(tiny_model_dir: Path) -> None:
    """A lone rank fails at once: it never waits for peers in the process group."""
    cmd = [sys.executable, "-m", "worker_svc", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0"]
    out = subprocess.run([*cmd, "--tensor-parallel-size", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "num_attention_heads (4) is not divisible by tensor_parallel_size (3)" in out.stderr


def test_serve_exits_when_tp_size_does_not_divide_heads(tiny_model_dir: Path) -> None:
    proc = nanovllm_serve(tiny_model_dir, free_port(), 3)
    try:
        assert proc.popen.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert "num_attention_heads (4) is not divisible by tensor_parallel_size (3)" in proc.output


def test_structured_output_tp2_matches_tp1(servers: list[tuple[str, Proc]]) -> None:
    """Each rank masks its own vocabulary shard before the logits are joined: the same valid output."""
    schema = json.dumps(test_structured.SCHEMA)

    def one(addr: str, prompt: str | list[int]) -> tuple[list[int], str]:
        with Client(addr) as client:
            msgs = list(client.generate(prompt, max_tokens=380, temperature=0.0, json_schema=schema, timeout=60))
        assert msgs[-1].finish_reason == "stop"
        return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)

    outputs = [[one(addr, p) for p in PROMPTS] for addr, _ in servers]
    assert outputs[0] == outputs[1]
    for _, text in outputs[1]:
        jsonschema.validate(json.loads(text), test_structured.SCHEMA)
