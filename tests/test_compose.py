"""compose.yaml as a real compose implementation resolves it, and its wiring run for real.

No Docker engine here, so each service's own command, environment and healthcheck run as local
processes, each on a loopback address of its own that stands in for its container: service names
resolve to it, 0.0.0.0 and 127.0.0.1 inside the service mean it, and the model mount maps back to
the host directory. The worker is started first and the scheduler only once the worker's own
healthcheck passes, as `depends_on: condition: service_healthy` does.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from client import Client

ROOT = Path(__file__).resolve().parents[1]
PUBLIC, METRICS = "51234", "51235"  # only compared with the resolved config: nothing binds them
VARS = {
    "NANOVLLM_PORT": PUBLIC,
    "NANOVLLM_METRICS_PORT": METRICS,
    "NANOVLLM_WORKER_ARGS": "--kv-cache-memory-gb 0.02",
    # One running sequence, so the drain test has a queued request too.
    "NANOVLLM_SCHEDULER_ARGS": "--max-num-seqs 1 --log-interval 1",
}
LONG = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True}


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if os.environ.get("CI"):
        pytest.fail("no compose implementation: .ci/run installs Debian's docker-compose")
    pytest.skip("needs docker-compose or the docker compose plugin")


def resolve(env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [*compose_command(), "--project-directory", str(ROOT), "-f", str(ROOT / "compose.yaml"), "config"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def services(tiny_model_dir) -> dict:
    out = resolve({**os.environ, "MODEL_DIR": str(tiny_model_dir), **VARS})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


def argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out.append((source, target, mode == ["ro"]))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def ports(svc: dict) -> dict[str, str]:
    """target -> published."""
    out = {}
    for p in svc.get("ports", []):
        if isinstance(p, str):
            published, target = p.rsplit(":", 2)[-2:]
        else:
            published, target = p["published"], p["target"]
        out[str(target).split("/")[0]] = str(published)
    return out


def test_model_dir_is_required() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_DIR"}
    out = resolve(env)
    assert out.returncode != 0 and "MODEL_DIR" in out.stderr


def test_wiring(services, tiny_model_dir) -> None:
    worker, scheduler = services["worker"], services["scheduler"]
    w, s = argv(worker["command"]), argv(scheduler["command"])
    assert w[:3] == ["python", "-m", "worker_svc"] and s[:3] == ["python", "-m", "scheduler_svc"]
    # The model: one read-only mount of MODEL_DIR, where --model points.
    for svc, words in ((worker, w), (scheduler, s)):
        assert mounts(svc) == [(str(tiny_model_dir), flag(words, "--model"), True)]
    # GPUs for the worker only; its port on the compose network only.
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in scheduler
    assert "ports" not in worker and flag(w, "--port") in [str(p) for p in worker.get("expose", [])]
    # The scheduler reaches the worker by service name; it starts once the worker is healthy.
    assert flag(s, "--workers") == f"worker:{flag(w, '--port')}"
    assert scheduler["depends_on"]["worker"]["condition"] == "service_healthy"
    # Its public and metrics ports are published where the variables say.
    assert ports(scheduler) == {flag(s, "--port"): PUBLIC, flag(s, "--metrics-port"): METRICS}
    assert flag(w, "--kv-cache-memory-gb") == "0.02" and flag(s, "--max-num-seqs") == "1"
    for svc, words in ((worker, w), (scheduler, s)):
        assert flag(words, "--host") == "0.0.0.0"
        assert svc["healthcheck"]["test"][:3] == ["CMD", "nanovllm", "health"]
        assert flag(svc["healthcheck"]["test"], "--addr") == f"127.0.0.1:{flag(words, '--port')}"


class Container:
    """One service run as a local process on its own loopback address."""

    def __init__(self, name: str, svc: dict, hosts: dict[str, str], logs: Path) -> None:
        self.name, self.svc, self.hosts = name, svc, hosts
        self.ip = hosts[name]
        self.mounts = {target: source for source, target, _ in mounts(svc)}
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def local(self, word: str) -> str:
        for target, source in self.mounts.items():
            if word == target or word.startswith(target + "/"):
                return source + word[len(target) :]
        word = word.replace("0.0.0.0", self.ip).replace("127.0.0.1", self.ip)
        for name, ip in self.hosts.items():
            word = re.sub(rf"(?<![\w.-]){re.escape(name)}(?=:\d)", ip, word)
        return word

    def env(self) -> dict[str, str]:
        env = self.svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        return {**os.environ, **{k: str(v) for k, v in env.items()}}

    def start(self) -> None:
        words = [self.local(w) for w in argv(self.svc["command"])]
        words[0] = sys.executable if words[0] == "python" else words[0]  # the image's interpreter
        self.proc = subprocess.Popen(words, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env())

    def check(self) -> subprocess.CompletedProcess:
        test = self.svc["healthcheck"]["test"]
        words = test[1:] if test[0] == "CMD" else ["sh", "-c", test[-1] if isinstance(test, list) else test]
        return subprocess.run([self.local(w) for w in words], capture_output=True, text=True, env=self.env())

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while self.check().returncode != 0:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()}"
            assert time.time() < deadline, f"{self.name} never became healthy:\n{self.log.read_text()}"
            time.sleep(0.25)

    def address(self, flag_name: str = "--port") -> str:
        return f"{self.ip}:{flag(argv(self.svc['command']), flag_name)}"


@pytest.fixture(scope="module")
def stack(services, tmp_path_factory):
    base = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    hosts = {name: f"{base}.{i + 2}" for i, name in enumerate(sorted(services))}
    logs = tmp_path_factory.mktemp("compose-logs")
    worker = Container("worker", services["worker"], hosts, logs)
    scheduler = Container("scheduler", services["scheduler"], hosts, logs)
    try:
        worker.start()
        worker.wait_healthy()
        scheduler.start()
        scheduler.wait_healthy()
        yield worker, scheduler
    finally:
        for c in (scheduler, worker):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(timeout=10)


def test_generation_streams_through_the_stack(stack) -> None:
    _, scheduler = stack
    with Client(scheduler.address()) as c:
        msgs = list(c.generate("The quick brown fox", max_tokens=8, temperature=0.0, ignore_eos=True))
    assert sum(len(m.token_ids) for m in msgs) == 8 and msgs[-1].finish_reason == "length"
    url = f"http://{scheduler.address('--metrics-port')}/metrics"
    assert (
        'nanovllm_requests_total{finish_reason="length"} 1.0' in urllib.request.urlopen(url, timeout=10).read().decode()
    )


def test_sigterm_drains_in_flight_requests_then_both_exit(stack) -> None:
    worker, scheduler = stack
    outs: list[list] = [[], []]

    def stream(i: int) -> None:
        with Client(scheduler.address()) as c:
            outs[i].extend(c.generate([5 + i, 6, 7], **LONG))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while not outs[0]:  # the first is running, the second queued behind it (--max-num-seqs 1)
        assert time.time() < deadline and threads[0].is_alive(), "the first request never streamed"
        time.sleep(0.02)
    # Both at once, as Ctrl-C or a cgroup-wide stop does; compose stops the scheduler first, which is easier.
    scheduler.proc.send_signal(signal.SIGTERM)
    worker.proc.send_signal(signal.SIGTERM)
    health = scheduler.check()
    assert health.returncode == 1 and health.stdout.strip() == "NOT_SERVING", health
    with Client(scheduler.address()) as c, pytest.raises(grpc.RpcError) as err:
        list(c.generate([1, 2, 3], max_tokens=2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(timeout=60)
    for out in outs:
        assert sum(len(m.token_ids) for m in out) == LONG["max_tokens"]
        assert out[-1].finish_reason == "length"
    assert scheduler.proc.wait(timeout=30) == 0, scheduler.log.read_text()
    assert worker.proc.wait(timeout=30) == 0, worker.log.read_text()
    assert "draining" in scheduler.log.read_text() and "draining" in worker.log.read_text()
