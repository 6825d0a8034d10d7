"""Reports Triton compilations, and torch.compile's graphs, made after the model runner's start-up.

Start-up compiles every kernel variant it can foresee (prefill shapes, CUDA-graph capture). In a
server, a variant first met later compiles inside some step, stalling every running request for
a second or more on a cold cache, so each one is logged with its specialisation: the signature
tells which argument made it new. (Check scripts that run their own shapes see these too.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class CompileWatch:
    """Callbacks for triton.knobs.runtime's jit hooks: `before` stamps a compilation's start,
    `after` logs it with its duration."""

    def __init__(self) -> None:
        self.started: dict[Any, float] = {}
        self.count = 0

    def before(self, *, key: Any, **_: Any) -> bool:
        self.started[key] = time.perf_counter()
        return False  # False: compile as usual

    def after(self, *, key: Any, repr: str, fn: Any = None, compile: dict | None = None, **_: Any) -> None:
        took = time.perf_counter() - self.started.pop(key, time.perf_counter())
        self.count += 1
        variant = repr + constexprs(fn, compile)
        log.warning("Triton compiled a kernel variant after start-up (%.2f s): %s", took, variant)

    def install(self) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook = self.before
        knobs.runtime.jit_post_compile_hook = self.after


def constexprs(fn: Any, compile: dict | None) -> str:
    """The variant's constexpr values by name (Triton keys them by argument index), which its repr
    leaves out: what tells two variants of one kernel apart."""
    constants = (compile or {}).get("constants") or {}
    names = getattr(getattr(fn, "jit_function", None), "arg_names", None) or []

    def name(k: Any) -> str:
        i = k[0] if isinstance(k, tuple) and len(k) == 1 else k
        return names[i] if isinstance(i, int) and i < len(names) else str(k)

    shown = {name(k): v for k, v in constants.items() if v is not None}
    return f"; constexprs {shown}" if shown else ""


class GraphWatch:
    """Counts and logs the graphs torch.compile (dynamo) compiles from its installation on: with
    `--compile`, start-up compiles every region for every token count, so any later one means a
    shape the warm-up missed, and a step that stalled for seconds."""

    def __init__(self) -> None:
        self.count = 0

    def after(self, args: Any) -> None:
        self.count += 1
        log.warning("torch.compile compiled a graph after start-up (compile id %s)", args.compile_id)

    def install(self) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_end_callback(self.after)
