"""Waiting in tests: poll a condition until a deadline instead of sleeping for a guessed time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], what: str | Callable[[], str], timeout: float = 10.0, every: float = 0.02) -> T:
    """Calls `cond` until it returns something true, and returns that; fails saying `what` (a text, or a function
    giving one, e.g. a process's output so far) once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what if isinstance(what, str) else what()}")
        time.sleep(every)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutputProcess:
    """A child process whose merged output is collected line by line on a thread (a full pipe would stall it)."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or ()), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        """The first output line holding `text`, once there; fails if the process exits before it."""

        def line() -> str | None:
            found = next((x for x in self.lines if text in x), None)
            assert found is not None or self.proc.poll() is None, f"exited before {text!r}:\n{''.join(self.lines)}"
            return found

        return wait_until(line, lambda: f"no {text!r}:\n{''.join(self.lines)}", timeout, every=0.05)

    def stop(self) -> None:
        """SIGTERM, as a supervisor stops it; SIGKILL if it has not exited 30 s later."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
