"""What the scheduler's and the workers' processes share at run time."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys

# A step carries every new sequence's whole prompt; gRPC's 4 MiB default would refuse a batch of
# long prompts, so the step stream between the scheduler and its workers allows 256 MiB.
STEP_STREAM_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
# The scheduler pings each worker this often, idle too, to find one that hangs (worker_client.py);
# the worker's server must accept pings as often.
PING_INTERVAL_MS = 2000
# Initial metadata a worker sends on the Step stream once it is the scheduler's: a scheduler that
# reconnects knows its stream was accepted, not refused because the old one has not ended yet.
STEP_ACCEPTED = "nanovllm-step-accepted"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def settle_heap() -> None:
    """Takes what start-up allocated (tokenizer, modules, weights' Python objects) out of the garbage
    collector's sight and makes collections rarer. Each step makes thousands of short-lived objects;
    with the default thresholds the collections they trigger kept walking the whole start-up heap,
    a fifth or more of a large step's host time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def die_with_parent(parent: int) -> None:
    """Linux SIGKILLs this process when the thread that started it ends, so that no worker or engine
    core outlives a launcher that was SIGKILLed (or OOM-killed) as an orphan holding its port and
    memory. Called in the child (e.g. as Popen's preexec_fn) with the parent's pid. Elsewhere a
    no-op: there, a closed socket or pipe tells."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)
