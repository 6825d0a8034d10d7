"""Ties a child process's life to its parent's, so that no worker or engine core outlives a launcher
that was SIGKILLed (or OOM-killed) and keeps its port and memory as an orphan."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Linux SIGKILLs this process when the thread that started it ends; called in the child (e.g. as
    Popen's preexec_fn) with the parent's pid. Elsewhere a no-op: there, a closed socket or pipe tells."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)
