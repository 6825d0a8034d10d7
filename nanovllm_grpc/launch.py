"""`nanovllm serve`: the scheduler in this process and one worker process per tensor-parallel rank.

Its flags are the worker's and the scheduler's own (each config builds them); the workers get theirs
back as a command line, so a setting added to WorkerConfig reaches them with no change here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from dataclasses import replace

from nanovllm_grpc.settings import add_flags, build, to_argv
from nanovllm_grpc.supervisor import WorkerProcesses
from scheduler_svc.config import SchedulerConfig
from worker_svc.config import PER_PROCESS, WorkerConfig


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    # The worker's first: a setting both have (--max-num-seqs) then takes the worker's default,
    # and the scheduler reads the same value.
    add_flags(p, WorkerConfig, "worker", skip=PER_PROCESS)
    add_flags(p, SchedulerConfig, "scheduler", skip=("workers",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_commands(worker: WorkerConfig, shutdown_timeout: float) -> tuple[list[list[str]], tuple[str, ...]]:
    """The command line of each rank's worker process, and the addresses they will serve on."""
    dist_port = free_port()
    cmds, addrs = [], []
    for rank in range(worker.tensor_parallel_size):
        # Ctrl-C reaches the workers too: they outwait the scheduler's drain, which closes their streams.
        rank_config = replace(
            worker, port=free_port(), rank=rank, dist_port=dist_port, shutdown_timeout=shutdown_timeout + 5
        )
        cmds.append([sys.executable, "-m", "worker_svc", *to_argv(rank_config)])
        addrs.append(f"{rank_config.host}:{rank_config.port}")
    return cmds, tuple(addrs)


async def _serve(config: SchedulerConfig, workers: WorkerProcesses) -> int:
    from scheduler_svc.server import Shutdown, serve

    shutdown = Shutdown()
    shutdown.install()
    watcher = asyncio.create_task(workers.supervise(shutdown.requested.is_set))
    server = asyncio.create_task(serve(config, shutdown))
    await asyncio.wait({server, watcher}, return_when=asyncio.FIRST_COMPLETED)
    gave_up = watcher.done() and not shutdown.requested.is_set()
    shutdown.now()  # the supervisor gave up on the workers: nothing can finish, no drain
    watcher.cancel()
    try:
        await server
    except Exception as e:
        print(f"nanovllm: the scheduler failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 1 if gave_up or workers.failed() else 0


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        worker: WorkerConfig = build(WorkerConfig, vars(args))
        cmds, addrs = worker_commands(worker, args.shutdown_timeout)
        config: SchedulerConfig = build(SchedulerConfig, {**vars(args), "workers": addrs})
    except ValueError as e:
        print(f"nanovllm serve: {e}", file=sys.stderr)
        return 2
    if config.port and not port_free(config.host, config.port):  # before minutes of loading the workers
        print(f"nanovllm serve: cannot listen on {config.host}:{config.port}: the port is in use", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workers = WorkerProcesses(cmds, list(addrs))
    workers.start()
    try:
        return asyncio.run(_serve(config, workers))
    finally:
        workers.stop()
