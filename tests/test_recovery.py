"""A worker lost mid-stream costs a pause, not a request: the scheduler holds every request's tokens,
reconnects to the worker's address (restarted here as compose would restart it), and recomputes.
Greedy and seeded outputs must equal a fault-free run's, token for token, none streamed twice."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg
from transformers import AutoTokenizer

from scheduler_svc.core import EngineCore
from tests.faults import NOT_SERVING, SERVING, Job, WorkerProcess, health, run_streams, wait_for
from tests.kv_subscriber import KvSubscriber
from tests.service import Loop, Service, make_server, scheduler_config

NUM_BLOCKS = 256
MAX_TOKENS = 32


def make_jobs(n: int = 50, seed: int = 0) -> list[Job]:
    """Greedy and seeded requests, mixed; ignore_eos so that each must stream exactly MAX_TOKENS."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(3, 40))]
        sampling = {"temperature": 0.0} if i % 2 else {"temperature": 0.9, "seed": 1000 + i, "top_k": 50}
        jobs.append((prompt, {"max_tokens": MAX_TOKENS, "ignore_eos": True, **sampling}))
    return jobs


class Cluster:
    """A worker process and a scheduler in this process (its core in a process of its own, or not)."""

    def __init__(self, model_dir, **scheduler: object) -> None:
        self.worker = WorkerProcess(model_dir, NUM_BLOCKS)
        self.worker.start()
        self.loop = Loop()
        config = scheduler_config(model_dir, self.worker.port, **scheduler)
        self.server = self.loop.call(make_server(config))
        self.addr = f"127.0.0.1:{self.loop.call(self.server.start())}"

    @property
    def metrics(self):
        return self.server.engine.metrics

    def restart_worker(self) -> None:
        self.worker.kill()
        self.worker.start()

    def assert_blocks_free(self) -> None:
        def free() -> bool:  # as the core last reported: it reports again when it goes idle
            stats = self.server.engine.stats
            return stats is not None and stats.blocks_free == NUM_BLOCKS and stats.running == stats.waiting == 0

        wait_for("every KV block free", free, 10)

    def stop(self) -> None:
        self.loop.call(self.server.stop(grace=0))
        self.loop.close()
        self.worker.stop()


@pytest.fixture(scope="module", params=[False, True], ids=["core-in-loop", "core-process"])
def cluster(tiny_model_dir, request):
    c = Cluster(tiny_model_dir, core_process=request.param, worker_recovery_timeout=120.0)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def jobs() -> list[Job]:
    return make_jobs()


@pytest.fixture(scope="module")
def reference(cluster, jobs) -> list[list[int]]:
    out = run_streams(cluster.addr, jobs)
    assert all(isinstance(t, list) and len(t) == MAX_TOKENS for t in out), out
    return out


def test_worker_killed_mid_stream_then_restarted(cluster, jobs, reference) -> None:
    restarts = cluster.metrics.worker_restarts
    out = run_streams(cluster.addr, jobs, {300: cluster.restart_worker})
    assert out == reference
    assert cluster.metrics.worker_restarts == restarts + 1
    assert cluster.metrics.requests_resumed > 0
    cluster.assert_blocks_free()


def test_constrained_streams_survive_a_worker_kill(cluster, tiny_model_dir) -> None:
    """A constrained sequence's matcher has accepted only the tokens the scheduler kept, so after a reset
    its masks go on from its known tokens: the same valid outputs as without the fault."""
    regex = "[a-z]{12,16}"
    rng = random.Random(1)
    jobs: list[Job] = []
    for i in range(24):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(3, 40))]
        sampling = {"temperature": 0.9, "seed": 2000 + i} if i % 2 else {"temperature": 0.0}
        if i % 4 < 2:
            sampling["regex"] = regex
        else:
            sampling["ignore_eos"] = True
        jobs.append((prompt, {"max_tokens": MAX_TOKENS, **sampling}))
    want = run_streams(cluster.addr, jobs)
    assert all(isinstance(t, list) for t in want), want
    restarts = cluster.metrics.worker_restarts
    got = run_streams(cluster.addr, jobs, {120: cluster.restart_worker})
    assert cluster.metrics.worker_restarts == restarts + 1
    assert got == want
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for (_, sampling), ids in zip(jobs, got, strict=True):
        if "regex" in sampling:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert re.fullmatch(regex, text), text
    cluster.assert_blocks_free()


def test_worker_killed_twice_in_a_row(cluster, jobs, reference) -> None:
    restarts = cluster.metrics.worker_restarts
    out = run_streams(cluster.addr, jobs, {200: cluster.restart_worker, 700: cluster.restart_worker})
    assert out == reference
    assert cluster.metrics.worker_restarts == restarts + 2
    cluster.assert_blocks_free()


def vllm_healthy(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:
        return vpbg.VllmEngineStub(ch).HealthCheck(vpb.HealthCheckRequest(), timeout=5).healthy


def test_worker_killed_while_idle_is_noticed_and_reconnected(cluster, jobs, reference) -> None:
    """Both health services turn NOT_SERVING, the gateway's KV subscribers see the cache cleared and
    the vllm: gauges show nothing running or cached; once back, the events match the cache again."""
    engine = cluster.server.engine
    sub = KvSubscriber(cluster.addr)
    try:
        wait_for("the subscriber's snapshot", lambda: bool(sub.blocks()), 10)  # the reference run cached blocks
        cluster.worker.kill()
        took = wait_for("health NOT_SERVING", lambda: health(cluster.addr) == NOT_SERVING, 10)
        assert took < 5
        assert not vllm_healthy(cluster.addr)
        sub.wait_for({})  # a CacheCleared: the lost worker's blocks are gone
        gauge = cluster.metrics.registry.get_sample_value
        label = {"model_name": cluster.metrics.model_name}
        assert gauge("vllm:kv_cache_usage_perc", label) == 0.0 and gauge("vllm:num_requests_running", label) == 0
        assert gauge("nanovllm_workers_up") == 0
        cluster.worker.start()
        wait_for("health SERVING", lambda: health(cluster.addr) == SERVING, 120)
        assert vllm_healthy(cluster.addr)
        assert run_streams(cluster.addr, jobs) == reference
        cluster.assert_blocks_free()
        core = engine.core
        # The core's own prefix cache where it runs in this process; else the frontend's mirror of it.
        sub.wait_for(core.scheduler.blocks.cached if isinstance(core, EngineCore) else engine.kv.live)
    finally:
        sub.close()


@pytest.mark.parametrize("then", ["SIGCONT", "restart"])
def test_hung_worker_turns_health_not_serving_and_resumes(cluster, jobs, reference, then) -> None:
    seen: list[float] = []

    def hang() -> None:
        pid = cluster.worker.proc.pid
        os.kill(pid, signal.SIGSTOP)

        def watch() -> None:
            try:
                seen.append(wait_for("health NOT_SERVING", lambda: health(cluster.addr) == NOT_SERVING, 20))
            finally:
                if then == "SIGCONT":
                    os.kill(pid, signal.SIGCONT)
                else:
                    cluster.restart_worker()

        threading.Thread(target=watch, daemon=True).start()

    out = run_streams(cluster.addr, jobs, {300: hang})
    assert seen, "health stayed SERVING while the worker hung"
    assert out == reference
    cluster.assert_blocks_free()


def test_recovery_timeout_fails_requests_then_serves_again(tiny_model_dir, jobs) -> None:
    c = Cluster(tiny_model_dir, core_process=False, worker_recovery_timeout=1.5)
    try:
        reference = run_streams(c.addr, jobs)
        lost_at: list[float] = []

        def kill() -> None:
            c.worker.kill()
            lost_at.append(time.monotonic())

        out = run_streams(c.addr, jobs, {300: kill})
        assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE for e in out), out
        assert time.monotonic() - lost_at[0] < 1.5 + 5  # promptly once the timeout has passed (slack for a busy CI)
        (late,) = run_streams(c.addr, jobs[:1])  # refused at once while the workers stay away
        assert isinstance(late, grpc.aio.AioRpcError) and late.code() == grpc.StatusCode.UNAVAILABLE
        c.worker.start()
        wait_for("health SERVING", lambda: health(c.addr) == SERVING, 120)
        assert run_streams(c.addr, jobs) == reference
        c.assert_blocks_free()
    finally:
        c.stop()


def test_a_step_past_its_deadline_counts_as_a_hung_worker(tiny_model_dir, jobs, caplog) -> None:
    """A worker that answers pings but not a step: the step deadline gives up on it and reconnects,
    and the requests resume once the worker has let go of its old stream."""
    svc = Service(tiny_model_dir, scheduler={"worker_step_timeout": 1.0}, num_kv_blocks=NUM_BLOCKS)
    try:
        reference = run_streams(svc.addr, jobs[:20])
        runner = svc.worker.servicer.runner
        collect, calls = runner.collect, 0

        def stuck_once(handle):
            nonlocal calls
            calls += 1
            if calls == 10:
                time.sleep(3)  # the step the scheduler gives up on
            return collect(handle)

        runner.collect = stuck_once
        assert run_streams(svc.addr, jobs[:20]) == reference
        assert svc.engine.metrics.worker_restarts >= 1
        assert "--worker-step-timeout" in caplog.text
    finally:
        svc.stop()
