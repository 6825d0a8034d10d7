"""Backpressure, deadlines and draining: clear statuses for the client, and no KV block left behind."""

from __future__ import annotations

import threading

import grpc
import pytest

from client import Client
from tests.polling import wait_until
from tests.service import Service

LONG = {"max_tokens": 450, "temperature": 0.0, "ignore_eos": True}  # ~2 s on a 2-core CPU


def all_free(svc: Service) -> bool:
    sched = svc.engine.core.scheduler
    return not sched.running and not sched.waiting and sched.blocks.num_free == sched.num_blocks


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    # One running sequence at a time and one queued: the third concurrent request is one too many.
    svc = Service(tiny_model_dir, scheduler={"max_num_seqs": 1, "max_queued_requests": 1}, num_kv_blocks=64)
    yield svc
    svc.stop()


def test_resource_exhausted_past_the_queue_limit(service) -> None:
    sched = service.engine.core.scheduler
    with Client(service.addr) as c:
        running = c.generate([5, 6, 7], **LONG)
        next(running)
        queued = c.generate([8, 9, 10], **LONG)
        wait_until(lambda: len(sched.waiting) == 1, "the second request was not queued")
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate([11, 12], max_tokens=2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 1" in err.value.details()
        running.cancel()
        assert len(next(queued).token_ids) >= 1  # the queued one gets the slot
        queued.cancel()
    wait_until(lambda: all_free(service), "blocks were not freed")
    with Client(service.addr) as c:  # and the service takes requests again
        assert sum(len(m.token_ids) for m in c.generate([11, 12], max_tokens=2, ignore_eos=True)) == 2


def test_deadline_of_a_running_request_aborts_it_and_frees_its_blocks(service) -> None:
    aborted = service.engine.metrics.finished["abort"]
    with Client(service.addr) as c, pytest.raises(grpc.RpcError) as err:
        list(c.generate([5, 6, 7], timeout=0.3, **LONG))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: all_free(service), "blocks were not freed after the deadline")
    assert service.engine.metrics.finished["abort"] == aborted + 1
    assert not service.engine.by_request_id


def test_deadline_of_a_queued_request_takes_it_off_the_queue(service) -> None:
    sched = service.engine.core.scheduler
    with Client(service.addr) as c:
        running = c.generate([5, 6, 7], **LONG)
        next(running)
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate([8, 9, 10], timeout=0.3, **LONG))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: not sched.waiting, "the expired request stayed queued")
        assert len(sched.running) == 1
        running.cancel()
    wait_until(lambda: all_free(service), "blocks were not freed")


def stream_in_thread(addr: str, prompt: list[int], out: list) -> threading.Thread:
    def go() -> None:
        try:
            with Client(addr) as c:
                out.extend(c.generate(prompt, **LONG))
        except grpc.RpcError as e:
            out.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_drain_finishes_running_and_queued_requests_and_refuses_new_ones(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, scheduler={"max_num_seqs": 1}, num_kv_blocks=64)
    try:
        outs: list[list] = [[], []]
        threads = [stream_in_thread(svc.addr, [5 + i, 6, 7], outs[i]) for i in range(2)]
        sched = svc.engine.core.scheduler
        # One running and one queued: a lone first request also sits in `waiting` for a moment, and a
        # drain begun then would refuse the second, still on its way.
        wait_until(lambda: len(sched.running) == 1 and len(sched.waiting) == 1, "the requests did not start")
        draining = svc.loop.submit(svc.server.drain(60.0))
        wait_until(lambda: svc.engine.draining, "the drain did not start")
        with Client(svc.addr) as c, pytest.raises(grpc.RpcError) as err:
            list(c.generate([1, 2, 3], max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        draining.result(timeout=60)
        for t in threads:
            t.join(timeout=30)
        for out in outs:
            last = out[-1]
            assert not isinstance(last, grpc.RpcError), f"a drained request failed: {last.code()}: {last.details()}"
            assert last.finish_reason == "length"
            assert sum(len(m.token_ids) for m in out) == LONG["max_tokens"]
        assert all_free(svc)
    finally:
        svc.stop()


def test_drain_timeout_gives_unfinished_requests_unavailable(tiny_model_dir) -> None:
    svc = Service(tiny_model_dir, num_kv_blocks=64)
    try:
        out: list = []
        thread = stream_in_thread(svc.addr, [5, 6, 7], out)
        wait_until(lambda: svc.engine.core.scheduler.running, "the request did not start")
        svc.call(svc.server.drain(0.0))
        thread.join(timeout=30)
        assert isinstance(out[-1], grpc.RpcError) and out[-1].code() == grpc.StatusCode.UNAVAILABLE
        assert "shut down before this request finished" in out[-1].details()
        wait_until(lambda: all_free(svc), "blocks were not freed")
        assert svc.engine.metrics.finished["error"] == 1
    finally:
        svc.stop()
