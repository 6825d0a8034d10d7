"""Each setting is declared once, as a config field: the flags, their help and the launcher's worker
command lines all come from it."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from nanovllm_grpc.cli import parser as nanovllm_parser
from nanovllm_grpc.launch import worker_commands
from nanovllm_grpc.settings import build, to_argv
from scheduler_svc import server as scheduler_server
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from worker_svc import server as worker_server
from worker_svc.config import WorkerConfig


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in nanovllm_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


@pytest.mark.parametrize("make", [serve_parser, scheduler_server.parser, worker_server.parser])
def test_every_flag_has_help_with_its_default(make) -> None:
    for action in make()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and ("default" in action.help or action.required), action.option_strings


def test_serve_hands_its_worker_settings_to_each_worker(tiny_model_dir: Path) -> None:
    argv = ["--model", str(tiny_model_dir), "--tensor-parallel-size", "2", "--max-num-seqs", "8"]
    argv += ["--enforce-eager", "--kv-cache-dtype", "fp8", "--seed", "7", "--device", "cpu", "--max-model-len", "64"]
    args = serve_parser().parse_args(argv)
    worker: WorkerConfig = build(WorkerConfig, vars(args))
    cmds, addrs = worker_commands(worker, shutdown_timeout=30.0)
    assert len(cmds) == len(addrs) == 2
    for rank, cmd in enumerate(cmds):
        assert cmd[1:3] == ["-m", "worker_svc"]
        got: WorkerConfig = build(WorkerConfig, vars(worker_server.parser().parse_args(cmd[3:])))
        assert addrs[rank] == f"127.0.0.1:{got.port}" and got.rank == rank
        assert got.dist_port == build(WorkerConfig, vars(worker_server.parser().parse_args(cmds[0][3:]))).dist_port
        assert got == WorkerConfig(
            **{**vars(worker), "rank": rank, "port": got.port, "dist_port": got.dist_port, "shutdown_timeout": 35.0}
        )
    # The shared settings reach the scheduler too, from the same flag.
    config: SchedulerConfig = build(SchedulerConfig, {**vars(args), "workers": addrs})
    assert (config.core.max_num_seqs, config.core.max_model_len) == (8, 64)


def test_to_argv_round_trips_a_scheduler_config(tiny_model_dir: Path) -> None:
    argv = ["--model", str(tiny_model_dir), "--workers", "a:1,b:2", "--no-prefix-caching", "--no-core-process"]
    argv += ["--max-inflight-steps", "2", "--metrics-port", "0", "--stream-interval", "4"]
    config: SchedulerConfig = build(SchedulerConfig, vars(scheduler_server.parser().parse_args(argv)))
    assert config.workers == ("a:1", "b:2") and not config.core_process and config.core.max_inflight_steps == 2
    again = build(SchedulerConfig, vars(scheduler_server.parser().parse_args(to_argv(config))))
    assert again == config


def test_no_prefix_caching_reaches_the_block_manager(tiny_model_dir: Path) -> None:
    argv = ["--model", str(tiny_model_dir), "--workers", "w:1", "--no-prefix-caching", "--max-num-seqs", "4"]
    config: SchedulerConfig = build(SchedulerConfig, vars(scheduler_server.parser().parse_args(argv)))
    # What the engine core does once the workers have said their own limits.
    limits = config.core.within(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=128)
    sched = Scheduler(limits, num_blocks=8, block_size=16, eos_token_ids={0})
    assert not sched.blocks.enable_prefix_caching
    assert (limits.max_num_seqs, limits.max_num_batched_tokens, limits.max_model_len) == (4, 8192, 128)


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("scheduler_svc", ["--model", "/no/such/dir", "--workers", "w:1"], "model directory '/no/such/dir' does not"),
        ("scheduler_svc", ["--workers", "w:1", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        ("worker_svc", ["--model", "/no/such/dir"], "model must be a directory holding config.json"),
        ("nanovllm_grpc", ["serve", "--model", "/no/such/dir"], "model must be a directory holding config.json"),
        ("worker_svc", ["--rank", "2", "--tensor-parallel-size", "2"], r"rank must be in \[0, 2\)"),
    ],
)
def test_bad_settings_end_in_one_line(tiny_model_dir: Path, module: str, argv: list[str], message: str) -> None:
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir), *argv]
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert re.search(message, last), out.stderr


def test_version_comes_from_the_package_metadata() -> None:
    out = subprocess.run([sys.executable, "-m", "nanovllm_grpc", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"nanovllm {version('nanovllm-grpc')}"
