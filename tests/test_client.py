"""The client library: light (grpc and the protos only), typed, and clear about bad values before
anything reaches the wire. Also the scheduler's layout: its metrics import neither its engine nor
the worker transport."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from client import Output, Sampling
from client.client import generate_request
from proto import generate_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_client_imports_neither_the_services_nor_torch() -> None:
    code = "import sys, client, client.cli; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    top = {name.split(".")[0] for name in out.stdout.split()}
    assert {"client", "proto", "grpc"} <= top
    assert not top & {"torch", "transformers", "scheduler_svc", "worker_svc", "nanovllm_grpc", "numpy"}


def test_metrics_and_messages_stand_apart_from_the_engine_and_the_worker_transport() -> None:
    code = "import sys, scheduler_svc.metrics, scheduler_svc.status; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(out.stdout.split())
    assert "scheduler_svc.messages" in loaded
    assert not loaded & {"scheduler_svc.engine", "scheduler_svc.worker_client", "grpc", "torch"}


def test_client_package_builds_a_light_wheel(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: the build leaves its files beside the sources
    skip = shutil.ignore_patterns("__pycache__", "node", "build", "*.egg-info")
    for package in ("client", "proto"):
        shutil.copytree(ROOT / package, src / package, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*cmd, str(src / "client")], capture_output=True, text=True, timeout=120, check=True)
    (wheel,) = tmp_path.glob("nanovllm_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packages = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode())
    assert packages == {"client", "proto"}
    requires = {r.split(">")[0].split("=")[0].strip() for r in meta.get_all("Requires-Dist")}
    assert requires == {"grpcio", "grpcio-health-checking", "protobuf"}


def test_a_str_stop_is_one_stop_string() -> None:
    assert list(Sampling(stop="abc").to_proto().stop) == ["abc"]
    assert list(generate_request("x", stop=["a", "bc"]).sampling.stop) == ["a", "bc"]
    with pytest.raises(TypeError):
        generate_request("x", max_token=3)  # a misspelt setting is not silently dropped


def test_unset_settings_leave_the_servers_defaults() -> None:
    msg = Sampling(max_tokens=4, temperature=0.0).to_proto()
    assert msg.max_tokens == 4 and msg.HasField("temperature") and not msg.HasField("top_p")


def test_output_reads_the_finish_reason_and_usage() -> None:
    msg = pb.GenerateResponse(token_ids=[1, 2], text="hi", finish_reason=pb.FINISH_REASON_LENGTH)
    msg.usage.CopyFrom(pb.Usage(prompt_tokens=3, completion_tokens=2))
    out = Output.from_proto(msg)
    assert (out.finish_reason, out.usage.completion_tokens, out.token_ids) == ("length", 2, [1, 2])
    assert Output.from_proto(pb.GenerateResponse(text="h")).finish_reason is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "-1"], r"sampling\.max_tokens must be in \[0, 4294967295\], got -1"),
        (["--max-tokens", str(2**32 + 1)], r"sampling\.max_tokens must be in \[0, 4294967295\], got 4294967297"),
        (["--seed", "-1"], r"sampling\.seed must be in \[0, 18446744073709551615\], got -1"),
        (["--logprobs", "-1"], r"sampling\.logprobs must be in \[0, 4294967295\], got -1"),
        (["--stop-token-ids", "5", "-2"], r"sampling\.stop_token_ids must be in \[0, 4294967295\], got -2"),
        (["--prompt-token-ids", "a,b"], r"--prompt-token-ids takes comma-separated integers, got 'a,b'"),
        (["--prompt-token-ids", "5,-1"], r"prompt token id must be in \[0, 4294967295\], got -1"),
    ],
)
def test_generate_refuses_what_the_wire_cannot_carry_in_one_line(flags: list[str], message: str) -> None:
    if "--prompt-token-ids" not in flags:
        flags = ["--prompt", "hi", *flags]
    cmd = [sys.executable, "-m", "nanovllm_grpc", "generate", "--addr", "127.0.0.1:9", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("nanovllm: INVALID_ARGUMENT: ")
    assert re.search(message, line), line
