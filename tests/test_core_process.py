"""The engine core in a process of its own: what happens when that process dies."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from client import Client
from tests.service import Service


def test_killed_core_ends_requests_with_unavailable_and_marks_the_engine_dead(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, engine={"core_process": True}, num_kv_blocks=256, block_size=16)
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
    svc = Service(tiny_model_dir, engine={"core_process": True}, num_kv_blocks=256, block_size=16)
    proc = svc.engine.core.proc
    with Client(svc.addr) as c:
        assert len([t for m in c.generate([5, 6, 7], max_tokens=5, ignore_eos=True) for t in m.token_ids]) == 5
    svc.stop()
    assert not proc.is_alive() and proc.exitcode == 0
