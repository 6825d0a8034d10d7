"""Standard gRPC health checking and server reflection, seen through grpcio's own generic clients."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from transformers import AutoTokenizer

from client import Client
from tests.faults import WorkerProcess, wait_for
from tests.polling import free_port, wait_until
from tests.service import Loop, Service, load, make_server, record_describes, scheduler_config, start_worker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GENERATION = "nanovllm.v1.Generation"


def check(addr: str, service: str = "") -> int:
    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_worker_not_serving_until_its_model_runner_is_built(tiny_model_dir) -> None:
    worker = start_worker(tiny_model_dir, ready=False)
    addr = f"127.0.0.1:{worker.port}"
    try:
        assert check(addr) == NOT_SERVING and check(addr, "nanovllm.worker.v1.Worker") == NOT_SERVING
        load(worker, tiny_model_dir, num_kv_blocks=16)
        assert check(addr) == SERVING and check(addr, "nanovllm.worker.v1.Worker") == SERVING
        started = time.monotonic()
        worker.drain(30.0, threading.Event())  # no scheduler connected: nothing to wait for
        assert time.monotonic() - started < 1.0
        assert check(addr) == NOT_SERVING
    finally:
        worker.stop(grace=0)


def test_scheduler_serving_only_with_its_workers_and_not_while_draining(tiny_model_dir, monkeypatch) -> None:
    describes = record_describes(monkeypatch)
    worker = start_worker(tiny_model_dir, ready=False)  # the scheduler comes up first, as after a crash
    loop = Loop()
    server = loop.call(make_server(scheduler_config(tiny_model_dir, worker.port, core_process=True)))
    try:
        addr = f"127.0.0.1:{loop.call(server.listen())}"
        connecting = loop.submit(server.connect())
        with grpc.insecure_channel(addr) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=GENERATION))
            assert next(watch).status == NOT_SERVING
            assert check(addr) == NOT_SERVING
            with Client(addr) as c, pytest.raises(grpc.RpcError) as err:
                list(c.generate([5, 6, 7], max_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_until(lambda: len(describes) >= 2, "the scheduler did not ask the loading worker again")
            assert not connecting.done()

            load(worker, tiny_model_dir, num_kv_blocks=16)
            connecting.result(timeout=30)
            assert next(watch).status == SERVING
            assert check(addr) == SERVING

            loop.call(server.drain(5.0))
            assert next(watch).status == NOT_SERVING
            assert check(addr) == NOT_SERVING
            with Client(addr) as c, pytest.raises(grpc.RpcError) as err:
                list(c.generate([5, 6, 7], max_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
            watch.cancel()
    finally:
        loop.call(server.stop(grace=0))
        loop.close()
        worker.stop(grace=0)


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(tiny_model_dir, num_kv_blocks=32, block_size=16)
    yield svc
    svc.stop()


def test_unknown_health_service_is_not_found(service) -> None:
    with pytest.raises(grpc.RpcError) as err:
        check(service.addr, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_calls_the_api_without_proto_files(service, tiny_model_dir) -> None:
    with grpc.insecure_channel(service.addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert {GENERATION, "grpc.health.v1.Health"} <= set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)  # a pool of its own: nothing from proto/ is used
        svc = pool.FindServiceByName(GENERATION)
        assert {m.name for m in svc.methods} == {"Generate", "Tokenize", "GetModelInfo"}

        def call(name: str, streaming: bool, **fields: object) -> list:
            method = svc.methods_by_name[name]
            req_cls = message_factory.GetMessageClass(method.input_type)
            res_cls = message_factory.GetMessageClass(method.output_type)
            make = ch.unary_stream if streaming else ch.unary_unary
            rpc = make(
                f"/{GENERATION}/{name}",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=res_cls.FromString,
            )
            out = rpc(req_cls(**fields), timeout=30)
            return list(out) if streaming else [out]

        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        (res,) = call("Tokenize", False, text="Hello world")
        assert list(res.token_ids) == tok.encode("Hello world", add_special_tokens=False)
        msgs = call("Generate", True, token_ids={"ids": [5, 6, 7]}, sampling={"max_tokens": 4, "ignore_eos": True})
        assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason == 2  # FINISH_REASON_LENGTH


@pytest.mark.slow
def test_scheduler_process_outlives_its_worker_and_serves_again_when_it_is_back(tiny_model_dir) -> None:
    """The scheduler process (its core in a process of its own) is NOT_SERVING while its worker is gone,
    answers UNAVAILABLE past the recovery timeout, and serves again once the worker is back."""
    worker = WorkerProcess(tiny_model_dir, num_kv_blocks=16)
    worker.start()
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler_svc", "--model", str(tiny_model_dir), "--port", str(port)]
    cmd += ["--workers", worker.addr, "--worker-recovery-timeout", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    addr = f"127.0.0.1:{port}"
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "ready on" in line:
                break
        assert proc.poll() is None, "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        worker.kill()
        wait_for("NOT_SERVING", lambda: check(addr) == NOT_SERVING, 5)
        with Client(addr) as c, pytest.raises(grpc.RpcError) as err:  # held until the recovery timeout, or refused
            list(c.generate([5, 6, 7], max_tokens=4, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        worker.start()
        wait_for("SERVING", lambda: check(addr) == SERVING, 120)
        with Client(addr) as c:
            assert sum(len(m.token_ids) for m in c.generate([5, 6, 7], max_tokens=4, ignore_eos=True)) == 4
        assert proc.poll() is None, "".join(lines)
    finally:
        proc.kill()
        worker.stop()
