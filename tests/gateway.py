"""The real SMG gateway (`smg launch`, from the `smg` package) as a subprocess on a free loopback port."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest

from tests.polling import free_port


def get_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=timeout).read())


class Gateway:
    """`smg launch --worker-urls grpc://...` in front of our replicas; stop() kills it."""

    def __init__(self, workers: list[str], model_dir: str | Path, log: Path, *args: str) -> None:
        if shutil.which("smg") is None:
            pytest.skip("needs the smg gateway (pip install smg; .ci/run installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["smg", "launch", "--host", "127.0.0.1", "--port", str(self.port), "--model-path", str(model_dir)]
        argv += ["--worker-urls", *(f"grpc://{w}" for w in workers), "--log-level", "warn", *args]
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(len(workers))
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, num_workers: int, timeout: float = 60.0) -> None:
        """Until the gateway lists the model and every worker as healthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                models = get_json(f"{self.url}/v1/models")["data"]
                workers = get_json(f"{self.url}/workers")["workers"]
                if models and sum(1 for w in workers if w.get("is_healthy")) == num_workers:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"smg not ready in {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.kill()  # a router holds no state worth a graceful drain (its own takes 5 s)
        self.proc.wait(timeout=30)
        self._out.close()
