"""Structured output on the worker: a grammar matcher per constrained sequence, and the masks they give.

The scheduler sends a constrained sequence's constraint with its AddSeq (worker.proto Grammar); it
is compiled here against the model's tokenizer (cached per constraint). The sequence's matcher
accepts its known output tokens when it is added (after a preemption or a lost worker, the state is
rebuilt from them), then each token sampled for it. Its row runs its step's forward pass with the
others, and its token is drawn once the token before it is on the host and its mask filled in
(ModelRunner.resolve), while the device still runs that step: the row skips no step, and the
batch never waits on a grammar.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from nanovllm_grpc.constraints import make_compiler, message, to_grammar
from proto import worker_pb2 as wpb
from worker_svc.seq_state import SeqState

log = logging.getLogger(__name__)
CACHE_SIZE = 64  # compiled grammars kept, least recently used dropped first


class Matchers:
    def __init__(self, model_dir: str, vocab_size: int) -> None:
        self.xgr, self.compiler = make_compiler(model_dir, vocab_size)
        self.vocab_size = vocab_size
        self.cache: OrderedDict[tuple[str, str, tuple[str, ...]], Any] = OrderedDict()

    @staticmethod
    def load(model_dir: str, vocab_size: int) -> Matchers | None:
        """Matchers for the model's tokenizer, or None (structured output off) without xgrammar or a tokenizer."""
        try:
            return Matchers(model_dir, vocab_size)
        except (ImportError, OSError, ValueError, TypeError) as e:
            log.info("structured output is off: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def start(self, seq: SeqState, grammar: wpb.Grammar) -> None:
        """Gives seq a matcher at its known output tokens; ValueError if they break the constraint."""
        key = (grammar.kind, grammar.spec, tuple(grammar.choices))
        compiled = self.cache.get(key)
        if compiled is None:
            spec = tuple(grammar.choices) if grammar.kind == "choice" else grammar.spec
            try:
                compiled = self.compiler.compile_grammar(to_grammar(self.xgr, grammar.kind, spec))
            except Exception as e:  # the scheduler compiled it: only a mismatch between the two gets here
                raise ValueError(f"the {grammar.kind} constraint does not compile here: {message(e)}") from e
            self.cache[key] = compiled
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        seq.matcher = self.xgr.GrammarMatcher(compiled)
        for token_id in seq.token_ids[seq.num_prompt_tokens :]:
            self.accept(seq, token_id)

    def accept(self, seq: SeqState, token_id: int) -> None:
        if seq.matcher.is_terminated():
            return  # its last tokens, drawn before the scheduler saw it end: dropped there
        if not seq.matcher.accept_token(token_id):
            # Only a bug gets here (the token was drawn under this matcher's mask); the scheduler's
            # matcher refuses it too and ends the request. Stop masking it.
            log.error("seq %d: the grammar refused token %d", seq.seq_id, token_id)
            seq.matcher = None

    def masks(self, seqs: list[SeqState], pinned: bool) -> torch.Tensor:
        """int32 [len(seqs), ceil(vocab / 32)]: row i allows the tokens seqs[i] may take next (bit j of
        word w: token 32 w + j); every token once its grammar is complete (that token is dropped)."""
        words = torch.empty(len(seqs), -(-self.vocab_size // 32), dtype=torch.int32, pin_memory=pinned)
        for i, seq in enumerate(seqs):
            if seq.matcher is None or seq.matcher.is_terminated():
                words[i] = -1
            else:
                seq.matcher.fill_next_token_bitmask(words, i)
        return words
