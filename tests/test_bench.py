"""The bench tools' shared harness on the CPU: its statistics against numpy, and every tool importing it."""

from __future__ import annotations

import argparse
import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import timing
from tests.triton_interpreter import require_triton

ROOT = Path(__file__).resolve().parent.parent
TOOLS = [
    "throughput",
    "timeline",
    "host_overhead",
    "host_path",
    "profile_step",
    "profile_prefill",
    "bench_decode",
    "bench_gemv",
    "bench_megakernel",
]


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentiles_match_numpy(n: int) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 50, 90, 99, 100):
        assert timing.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert timing.median(values) == pytest.approx(float(np.median(values)), rel=1e-12)
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_results_print_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    timing.print_results({"full_tok_s": 19915.25, "tpot_ms": 1.5})
    assert capsys.readouterr().out == "full_tok_s: 19,915.250\n   tpot_ms: 1.500\n"


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_imports(tool: str) -> None:
    """The tools run on a GPU only; importing one checks its wiring to the harness and the services here."""
    require_triton()
    assert callable(importlib.import_module(f"bench.{tool}").main)


@pytest.mark.slow
def test_host_path_runs_the_real_processes_on_an_emulated_device() -> None:
    """bench/host_path.py on the tiny model: the real worker, scheduler and core processes serve the
    single-request benchmark, and no token comes faster than the emulated device's step."""
    from bench import host_path, throughput

    model = throughput.model_dir(argparse.Namespace(model="bench/qwen3-tiny"))  # 4096 positions, 2048 ids
    res = host_path.measure(model, 3.0, 0.0, [])
    assert res["tpot_ms"] >= 3.0 * 0.99, res
    assert {"cpu_ms_per_token_worker", "cpu_ms_per_token_core", "cpu_ms_per_token_scheduler"} <= res.keys()
    assert all(v > 0 for k, v in res.items() if k.startswith("cpu")), res


def test_ab_alternates_packed_trees(tmp_path: Path) -> None:
    """bench/ab.sh: `pack` puts each ref's files in a tree of its own; `run` runs the command from each
    tree's root, in a process of its own, names alternated within every round, its code first on the path."""
    env = {**os.environ, "AB_DIR": str(tmp_path)}
    script = str(ROOT / "bench" / "ab.sh")
    old = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD~1"], capture_output=True, text=True)
    subprocess.run([script, "pack", "new=HEAD", "old=HEAD~1"], env=env, check=True, capture_output=True)
    assert (tmp_path / "new" / "bench" / "gpu_suite.sh").is_file()
    assert (tmp_path / "old" / ".ab-ref").read_text() == f"old {old.stdout.strip()}\n"
    probe = "import os, bench; print(os.getcwd(), os.path.dirname(os.path.dirname(bench.__file__)))"
    cmd = [script, "run", "2", "old", "new", "--", sys.executable, "-c", probe]
    lines = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    runs = [
        (header.split()[1], header.split()[4], where.split())
        for header, where in zip(lines[::2], lines[1::2], strict=True)
    ]
    assert runs == [(name, f"{r}:", [str(tmp_path / name)] * 2) for r in (1, 2) for name in ("old", "new")]
    bad = subprocess.run([script, "run", "2", "old"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "bench/ab.sh run ROUNDS" in bad.stderr


def test_megakernel_matches_the_chain_under_the_interpreter() -> None:
    """bench_megakernel.py --tiny: the persistent kernel, phase by phase, against the served kernel chain on
    a two-layer fp32 stack, with one key tile a split and several."""
    require_triton()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_megakernel.py"), "--tiny"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errs = [float(word.rstrip(",")) for line in out.stdout.splitlines() for word in line.split()[-3::2]]
    assert len(errs) == 4 and max(errs) < 1e-5, out.stdout
