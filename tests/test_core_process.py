"""The engine core in a process of its own: what happens when that process dies."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from client import Client
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from tests.service import Loop, Service, scheduler_config


async def make_engine(config: SchedulerConfig) -> Engine:
    return Engine(config)  # built on the loop: its asyncio objects belong there


def test_killed_core_ends_requests_with_unavailable_and_marks_the_engine_dead(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, scheduler={"core_process": True}, num_kv_blocks=256, block_size=16)
    try:
        with Client(svc.addr) as c:
            call = c.generate([5, 6, 7], max_tokens=400, temperature=0.0, ignore_eos=True)
            next(call)
            started = time.monotonic()
            os.kill(svc.engine.core.proc.pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine core process exited unexpectedly" in err.value.details()
            assert time.monotonic() - started < 10
            assert "engine core" in svc.call(svc.engine.wait_dead())
            with pytest.raises(grpc.RpcError) as err:  # new requests are refused the same way
                list(c.generate([5, 6, 7], max_tokens=3))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        svc.stop()


def test_the_core_process_exits_when_the_engine_stops(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, scheduler={"core_process": True}, num_kv_blocks=256, block_size=16)
    proc = svc.engine.core.proc
    with Client(svc.addr) as c:
        assert len([t for m in c.generate([5, 6, 7], max_tokens=5, ignore_eos=True) for t in m.token_ids]) == 5
    svc.stop()
    assert not proc.is_alive() and proc.exitcode == 0


def test_a_core_still_connecting_exits_when_the_frontend_goes(tiny_model_dir) -> None:
    """The workers are still loading when the engine is stopped: the core must not linger as an
    orphan until its connect timeout."""
    from tests.service import start_worker

    worker = start_worker(tiny_model_dir, ready=False)
    config = scheduler_config(tiny_model_dir, worker.port, core_process=True)
    loop = Loop()
    try:
        engine = loop.call(make_engine(config))
        starting = loop.submit(engine.start())
        deadline = time.monotonic() + 30
        while (engine.core.proc is None or not engine.core.proc.is_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc = engine.core.proc
        time.sleep(1.0)  # connected to the frontend, waiting for the worker
        starting.cancel()
        started = time.monotonic()
        loop.call(engine.stop())
        assert not proc.is_alive() and time.monotonic() - started < 5
    finally:
        loop.close()
        worker.stop(grace=0)
