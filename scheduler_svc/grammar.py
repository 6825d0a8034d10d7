"""Structured output in the engine core: compiled grammars, and one matcher per constrained sequence.

xgrammar does the work (chosen over llguidance by measurement: see the README). A constraint is
compiled once per spec, in a thread pool and cached; each constrained sequence gets a matcher that
has accepted exactly its known output tokens. After each of its tokens the matcher computes the
next token bitmask in a thread (xgrammar releases the GIL), and the scheduler runs the sequence's
next sampling step only when that mask is ready, so the step loop never waits for a grammar.
Preemption and a lost worker change no known token, so the matcher needs no rebuilding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from scheduler_svc.errors import InvalidRequest
from scheduler_svc.sampling_params import Constraint
from scheduler_svc.sequence import FinishReason

log = logging.getLogger(__name__)

# Compiled grammars kept, least recently used dropped first: about 3 MB each for Qwen3's vocabulary.
CACHE_SIZE = 64
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
_PLAIN = re.compile(r"[ !#-\[\]-~]+|.", re.S)  # printable ASCII runs but " and \, or any one other character


def message(e: Exception) -> str:
    """xgrammar's error in one line, without the C++ source location it starts with."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return _LOCATION.sub("", first)[:500]


def to_grammar(xgr: Any, c: Constraint) -> Any:
    """The constraint as an xgrammar Grammar; raises xgrammar's error when it does not parse."""
    # JSON as json.dumps writes it, ", " and ": " between items and no other whitespace: the form
    # models learned, and no room for the runs of blank lines they can fall into under a grammar.
    if c.kind == "json_schema":
        return xgr.Grammar.from_json_schema(c.spec, any_whitespace=False)
    if c.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if c.kind == "regex":
        return xgr.Grammar.from_regex(c.spec)
    if c.kind == "grammar":
        return xgr.Grammar.from_ebnf(c.spec)
    if c.kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_literal(s) for s in c.spec))
    tag = json.loads(c.spec)
    if isinstance(tag, dict) and "structures" in tag:  # the older format: tags opened by triggers
        items = [
            xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
            for s in tag["structures"]
        ]
        return xgr.Grammar.from_structural_tag(items, tag.get("triggers", []))
    return xgr.Grammar.from_structural_tag(c.spec)


def _literal(text: str) -> str:
    """text as a sequence of EBNF string literals, each character other than printable ASCII in a
    literal of its own: xgrammar reads an escape's hex digits greedily, and keeps a non-ASCII
    character as one, so "ïc" in one literal would be U+0EFC."""
    return "(" + " ".join(json.dumps(p, ensure_ascii=False) for p in _PLAIN.findall(text)) + ")"


class GrammarState:
    """One sequence's matcher and the bitmask of the tokens it may sample next."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int, fills: ThreadPoolExecutor, wake: Callable[[], None]):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.fills = fills
        self.wake = wake
        self.pending: Future[None] | None = None
        self.matcher.fill_next_token_bitmask(self.bitmask)  # built in a pool thread: no need to defer

    @property
    def ready(self) -> bool:
        """Whether the mask for the next token is computed."""
        return self.pending is None or self.pending.done()

    def mask(self) -> bytes:
        assert self.ready, "the scheduler runs a constrained sequence only once its mask is ready"
        return self.bitmask.numpy().tobytes()

    def accept(self, token_id: int) -> FinishReason | None:
        """Advances past a sampled token; STOP once the grammar is complete."""
        if not self.matcher.accept_token(token_id):
            # Only a token outside the mask gets here: a bug, not the client's doing.
            log.error("the grammar refused sampled token %d; ending the request", token_id)
            return FinishReason.ABORT
        if self.matcher.is_terminated():
            return FinishReason.STOP
        self.pending = self.fills.submit(self.matcher.fill_next_token_bitmask, self.bitmask)
        self.pending.add_done_callback(lambda _: self.wake())
        return None


class Grammars:
    """Compiles constraints for one model's tokenizer and starts each sequence's matcher."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_token_ids: frozenset[int], fill_threads: int = 4):
        self.vocab_size = vocab_size
        self.compiles = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        self.fills = ThreadPoolExecutor(fill_threads, thread_name_prefix="grammar-mask")
        self.cache: OrderedDict[Constraint, Future[Any]] = OrderedDict()
        # Importing xgrammar (it imports torch) and reading the vocabulary take seconds on a thread
        # that holds the GIL for most of them: `ready` waits for it before the core serves, so that
        # it never competes with the step loop.
        self._compiler: Future[tuple[Any, Any]] = self.compiles.submit(
            self._make_compiler, tokenizer_dir, vocab_size, eos_token_ids
        )

    async def ready(self) -> None:
        """Returns once the vocabulary is read and the compiler made (or raises why not)."""
        await asyncio.wrap_future(self._compiler)

    @staticmethod
    def _make_compiler(tokenizer_dir: str, vocab_size: int, eos_token_ids: frozenset[int]) -> tuple[Any, Any]:
        import xgrammar as xgr
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        eos = sorted(eos_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        return xgr, xgr.GrammarCompiler(info, cache_enabled=False)  # the cache here is bounded; its own is not

    async def start(self, constraint: Constraint, wake: Callable[[], None]) -> GrammarState:
        """A matcher at the start of the constraint, its first mask computed; InvalidRequest with
        xgrammar's message when the constraint does not compile."""
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
        xgr = self._compiler.result()[0]
        return await asyncio.wrap_future(
            self.compiles.submit(GrammarState, xgr, compiled, self.vocab_size, self.fills, wake)
        )

    def _compile(self, constraint: Constraint) -> Any:
        xgr, compiler = self._compiler.result()
        return compiler.compile_grammar(to_grammar(xgr, constraint))

    def close(self) -> None:
        self.compiles.shutdown(wait=False, cancel_futures=True)
        self.fills.shutdown(wait=False, cancel_futures=True)
