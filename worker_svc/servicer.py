"""The worker's gRPC side: Describe, and the Step stream handed to the executor.

The model runner is built after the server starts, so Describe answers (ready=False) while
weights load.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from nanovllm_grpc.process import STEP_ACCEPTED
from proto import worker_pb2 as wpb
from proto import worker_pb2_grpc as wgrpc
from worker_svc.executor import END, Executor, Ready
from worker_svc.model_runner import ModelRunner

log = logging.getLogger(__name__)


def describe(runner: ModelRunner, rank: int, world_size: int) -> wpb.WorkerInfo:
    """What a ready worker tells its scheduler: the limits it was built with."""
    return wpb.WorkerInfo(
        rank=rank,
        world_size=world_size,
        num_kv_blocks=runner.num_kv_blocks,
        block_size=runner.block_size,
        max_model_len=runner.max_model_len,
        vocab_size=runner.vocab_size,
        max_num_seqs=runner.config.max_num_seqs,
        max_num_batched_tokens=runner.config.max_num_batched_tokens,
        device=runner.device.type,
        ready=True,
        structured_output=runner.matchers is not None,
    )


class WorkerServicer(wgrpc.WorkerServicer):
    def __init__(self, rank: int, world_size: int, device: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.runner: ModelRunner | None = None
        self._stream_lock = threading.Lock()

    def connected(self) -> bool:
        """Whether a scheduler holds the step stream."""
        return self._stream_lock.locked()

    def Describe(self, request: wpb.DescribeRequest, context: grpc.ServicerContext) -> wpb.WorkerInfo:
        if self.runner is None:
            return wpb.WorkerInfo(rank=self.rank, world_size=self.world_size, device=self.device)
        return describe(self.runner, self.rank, self.world_size)

    def Step(self, requests: Iterator[wpb.StepRequest], context: grpc.ServicerContext) -> Iterator[wpb.StepResult]:
        if self.runner is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is still loading the model")
        # A scheduler that lost this stream (a step past its deadline) may reconnect before the old
        # stream has ended: it ends after the step it is running, so wait for that a while.
        if not self._stream_lock.acquire(timeout=10.0):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another scheduler is already connected")
        context.send_initial_metadata(((STEP_ACCEPTED, "1"),))
        dropped = threading.Event()  # the scheduler cancelled the stream rather than ending it
        try:
            yield from self._run(requests, dropped)
        except Exception:
            if self.world_size > 1:
                # A failed collective (a peer died) leaves this rank outside any group it could
                # rejoin: exit, so that its supervisor restarts it with the rest of the group.
                log.exception("a step failed; exiting, as this rank cannot rejoin its tensor-parallel group")
                os._exit(1)
            raise
        finally:
            self._stream_lock.release()
            if self.world_size > 1 and (dropped.is_set() or _cancelled(context)):
                # The scheduler gave up on the group (a peer died, maybe while idle) or died itself:
                # a rank cannot rejoin a group whose peer restarted, so the whole group restarts.
                log.error("the scheduler dropped the step stream; exiting, for the group to restart")
                os._exit(1)

    def _run(self, requests: Iterator[wpb.StepRequest], dropped: threading.Event) -> Iterator[wpb.StepResult]:
        assert self.runner is not None
        # A reader thread queues requests as they arrive: the executor waits on that one queue for
        # the next step or for its launched step's completion, whichever comes first.
        inbox: queue.Queue[wpb.StepRequest | Ready | None] = queue.Queue()

        def read() -> None:
            try:
                for req in requests:
                    inbox.put(req)
            except grpc.RpcError:
                dropped.set()  # the scheduler went away; END below ends the run
            finally:
                inbox.put(END)

        threading.Thread(target=read, name="step-reader", daemon=True).start()
        yield from Executor(self.runner, answer=self.rank == 0).run(inbox)
        log.info("scheduler stream closed")


def _cancelled(context: grpc.ServicerContext, wait: float = 1.0) -> bool:
    """Whether the scheduler cancelled the stream rather than ended it: a cancel can reach this
    side just after the stream's end, so it gets `wait` seconds to show."""
    deadline = time.monotonic() + wait
    while context.is_active():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
