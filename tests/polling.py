"""Waiting in tests: poll a condition until a deadline instead of sleeping for a guessed time."""

from __future__ import annotations

import socket
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
