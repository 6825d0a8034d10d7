"""The engine core in a process of its own, as vLLM runs its engine core apart from its API server.

The scheduler process then runs two Python interpreters: the frontend (gRPC server, tokenizer,
detokenizer, one coroutine per client stream) and the core (scheduling, the worker streams). Each
gets a core of the CPU, so streaming hundreds of requests no longer delays the next step.

They talk over a Unix socket with messages.py's messages, pickled, each framed by its length. Both
ends write without blocking (asyncio buffers), so a burst of Adds and a burst of StepOutputs can
never deadlock each other. The frontend sees the core die as the socket closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from nanovllm_grpc.process import die_with_parent, settle_heap
from scheduler_svc.config import CoreConfig
from scheduler_svc.core import EngineCore
from scheduler_svc.errors import WorkerUnavailable
from scheduler_svc.messages import Add, CoreInfo, Dead, Event, Finish, Flush, Started

log = logging.getLogger(__name__)
_HEADER = struct.Struct("!I")


def _frame(msg: object) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> object:
    """The next message; raises asyncio.IncompleteReadError once the other end is gone."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


class ProcessCore:
    """The frontend's handle on a core process: EngineCore's add/finish/stop, over the socket."""

    def __init__(
        self,
        config: CoreConfig,
        workers: tuple[str, ...],
        eos_token_ids: frozenset[int],
        emit: Callable[[Event], None],
        tokenizer: str | None = None,
    ) -> None:
        self.args = (config, workers, eos_token_ids, tokenizer)  # the core process's, after the socket's path
        self.emit = emit
        self.proc: multiprocessing.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> CoreInfo:
        """Starts the process; returns once it has connected to every worker."""
        folder = Path(tempfile.mkdtemp(prefix="nanovllm-core-"))
        path = str(folder / "core.sock")
        connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not connected.done():
                connected.set_result((reader, writer))

        server = await asyncio.start_unix_server(accept, path)
        try:
            # spawn: a fork would copy this process's gRPC and asyncio state into the child
            self.proc = multiprocessing.get_context("spawn").Process(
                target=main, args=(path, os.getpid(), *self.args), name="nanovllm-core", daemon=True
            )
            self.proc.start()
            while not connected.done():
                if not self.proc.is_alive():
                    raise WorkerUnavailable(f"the engine core process exited at start (exit code {self.proc.exitcode})")
                await asyncio.wait({connected}, timeout=0.1)
        finally:
            server.close()
            shutil.rmtree(folder, ignore_errors=True)  # connected or failed: the path has served
        reader, self._writer = connected.result()
        try:
            first = await _read(reader)  # Started once the workers are ready, which may take minutes
        except asyncio.IncompleteReadError:
            raise WorkerUnavailable("the engine core process exited while connecting to the workers") from None
        if isinstance(first, Dead):
            raise WorkerUnavailable(first.why)
        assert isinstance(first, Started), first
        self._reading = asyncio.create_task(self._read_events(reader))
        return first.info

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                event = await _read(reader)
                self.emit(event)  # type: ignore[arg-type]
                if isinstance(event, Dead):
                    return
        except asyncio.IncompleteReadError:
            code = self.proc.exitcode if self.proc is not None else None
            self.emit(Dead(f"the engine core process exited unexpectedly (exit code {code})"))

    def add(self, msg: Add) -> None:
        self._send(msg)

    def finish(self, msg: Finish) -> None:
        self._send(msg)

    def flush(self) -> None:
        self._send(Flush())

    def _send(self, msg: Add | Finish | Flush) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_frame(msg))

    async def stop(self) -> None:
        """Closing the socket tells the core to stop; it closes its worker streams and exits."""
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 10.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def main(
    path: str,
    parent: int,
    config: CoreConfig,
    workers: tuple[str, ...],
    eos_token_ids: frozenset[int],
    tokenizer: str | None,
) -> None:
    """The core process: connects back to the frontend, then to the workers, then steps."""
    die_with_parent(parent)
    # Ctrl-C (or a SIGTERM to the process group) reaches this process too; the frontend drains
    # and then closes the socket, which is this process's signal to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    asyncio.run(_serve(path, config, workers, eos_token_ids, tokenizer))


async def _serve(
    path: str, config: CoreConfig, workers: tuple[str, ...], eos_token_ids: frozenset[int], tokenizer: str | None
) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    finally:  # the frontend removes it too, unless it was killed while this process started
        shutil.rmtree(Path(path).parent, ignore_errors=True)
    core = EngineCore(config, workers, eos_token_ids, lambda event: writer.write(_frame(event)), tokenizer)
    try:
        # The frontend sends nothing before Started, so a read that returns while the workers load
        # means it is gone (EOF): stop then, rather than wait out the connect timeout as an orphan.
        starting = asyncio.ensure_future(core.start())
        gone = asyncio.ensure_future(reader.read(1))
        await asyncio.wait({starting, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not starting.done():
            starting.cancel()
            return
        try:
            info = starting.result()
        except WorkerUnavailable as e:
            writer.write(_frame(Dead(str(e))))
            return
        writer.write(_frame(Started(info)))
        settle_heap()
        commands = asyncio.ensure_future(_apply(reader, core))
        dead = asyncio.ensure_future(core.wait_dead())
        await asyncio.wait({commands, dead}, return_when=asyncio.FIRST_COMPLETED)
        commands.cancel()
        dead.cancel()
    finally:
        with contextlib.suppress(ConnectionError):
            await writer.drain()  # a Dead must reach the frontend before this process exits
        await core.stop()
        writer.close()


async def _apply(reader: asyncio.StreamReader, core: EngineCore) -> None:
    """Applies the frontend's messages until it closes the socket."""
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            msg = await _read(reader)
            if isinstance(msg, Add):
                core.add(msg)
            elif isinstance(msg, Finish):
                core.finish(msg)
            elif isinstance(msg, Flush):
                core.flush()
            else:
                raise TypeError(f"unexpected message from the frontend: {msg!r}")
