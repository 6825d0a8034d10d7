"""The README's first command, as a newcomer runs it, and the model writer it uses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import free_port

REPO = Path(__file__).resolve().parents[1]
INSTALL = "python3 -m pip install torch==2.13.0 && python3 -m pip install -e '.[dev]' && "


def readme_command_1() -> str:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block"
    lines = block.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    return next(line for line in lines[start:] if not line.startswith("#"))


@pytest.mark.slow
def test_readme_command_1_serves_generates_and_returns(tmp_path: Path) -> None:
    """Everything after the install (CI has installed the project): it writes the model, serves it, streams one
    generation and then stops the server, so the command returns on its own with status 0."""
    if shutil.which("nanovllm") is None:
        pytest.fail("the nanovllm console script is not installed: run `pip install -e .`")
    command = readme_command_1()
    assert command.startswith(INSTALL)
    port = free_port()
    command = command.removeprefix(INSTALL).replace("/tmp/tiny-qwen3", str(tmp_path / "model"))
    command = command.replace("--device cpu", f"--device cpu --port {port}")
    command = command.replace("nanovllm generate", f"nanovllm generate --addr 127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"scheduler ready on 127.0.0.1:{port}" in out.stdout + out.stderr
    assert out.stdout.strip(), "no generated text"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "model") not in ps, "a server process outlived the command"


@pytest.mark.slow
def test_tiny_model_help_writes_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "tests.tiny_model"]
    out = subprocess.run([*run, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "path" in out.stdout and "--seed" in out.stdout
    assert list(tmp_path.iterdir()) == []
    out = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "required: path" in out.stderr
    assert list(tmp_path.iterdir()) == []
