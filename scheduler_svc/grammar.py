"""Structured output in the engine core: compiled grammars, and one matcher per constrained sequence.

xgrammar does the work (chosen over llguidance by measurement: see the README). A constraint is
compiled once per spec, in a thread pool and cached: a spec that does not compile is the client's
error, told before the request is queued. The worker masks the logits with its own matcher where
tokens are drawn (worker_svc/matchers.py); the core's matcher follows the same tokens, to end the
sequence once its grammar is complete. Preemption and a lost worker change no known token, so
this matcher needs no rebuilding (the worker rebuilds its own from the tokens it is sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from nanovllm_grpc.constraints import make_compiler, message, to_grammar
from scheduler_svc.errors import InvalidRequest
from scheduler_svc.sampling_params import Constraint
from scheduler_svc.sequence import FinishReason

log = logging.getLogger(__name__)

# Compiled grammars kept, least recently used dropped first: about 3 MB each for Qwen3's vocabulary.
CACHE_SIZE = 64


class GrammarState:
    """One sequence's matcher, at its known output tokens."""

    def __init__(self, xgr: Any, compiled: Any) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> FinishReason | None:
        """Advances past a sampled token; STOP once the grammar is complete."""
        if not self.matcher.accept_token(token_id):
            # Only a token outside the worker's mask gets here: a bug, not the client's doing.
            log.error("the grammar refused sampled token %d; ending the request", token_id)
            return FinishReason.ABORT
        if self.matcher.is_terminated():
            return FinishReason.STOP
        return None


class Grammars:
    """Compiles constraints for one model's tokenizer and starts each sequence's matcher."""

    def __init__(self, model_dir: str, vocab_size: int) -> None:
        self.compiles = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        self.cache: OrderedDict[Constraint, Future[Any]] = OrderedDict()
        # Importing xgrammar (it imports torch) and reading the vocabulary take seconds on a thread
        # that holds the GIL for most of them: `ready` waits for it before the core serves, so that
        # it never competes with the step loop.
        self._compiler: Future[tuple[Any, Any]] = self.compiles.submit(make_compiler, model_dir, vocab_size)

    async def ready(self) -> None:
        """Returns once the vocabulary is read and the compiler made (or raises why not)."""
        await asyncio.wrap_future(self._compiler)

    async def start(self, constraint: Constraint) -> GrammarState:
        """A matcher at the start of the constraint; InvalidRequest with xgrammar's message when the
        constraint does not compile."""
        future = self.cache.get(constraint)
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = self.compiles.submit(self._compile, constraint)
            self.cache[constraint] = future
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(constraint)
        try:
            # Shielded: a request aborted meanwhile must not cancel a compile that others share.
            compiled = await asyncio.shield(asyncio.wrap_future(future))
        except Exception as e:
            if self.cache.get(constraint) is future:
                del self.cache[constraint]
            raise InvalidRequest(f"the {constraint.kind} constraint does not compile: {message(e)}") from e
        return GrammarState(self._compiler.result()[0], compiled)

    def _compile(self, constraint: Constraint) -> Any:
        xgr, compiler = self._compiler.result()
        return compiler.compile_grammar(to_grammar(xgr, constraint.kind, constraint.spec))

    def close(self) -> None:
        self.compiles.shutdown(wait=False, cancel_futures=True)
