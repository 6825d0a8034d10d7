"""Incremental detokenization with stop strings, one instance per request.

Deltas never split a UTF-8 character: a fast tokenizer's own decode stream (one call into Rust
per token, as this runs for every token of every request) returns nothing until a character is
complete; other tokenizers decode a small window that waits while it ends in U+FFFD. Text that
could still turn out to be the start of a stop string is held back until it can't, so nothing
past a stop string is ever streamed.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window in ids
        self.read = 0  # ids before this are in self.text
        self.text = ""  # completion text decoded so far (trimmed at a stop string once found)
        self.sent = 0  # characters of self.text already streamed
        self.stopped_on: str | None = None
        self.backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer of a fast one
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self.backend is not None else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str | None:
        """Takes one completion token; returns the stop string if it ends the text."""
        self.ids.append(token_id)
        if self.stream is not None:
            piece = self.stream.step(self.backend, token_id)
            if not piece:
                return None
            start = len(self.text)
            self.text += piece
            self.read = len(self.ids)
            return self._find_stop(start)
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if window.endswith(REPLACEMENT) or len(window) <= len(before):
            return None  # an unfinished character (or nothing visible) yet
        start = len(self.text)
        self.text += window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._find_stop(start)

    def _find_stop(self, start: int) -> str | None:
        if not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            j = self.text.find(s, max(0, start - len(s) + 1))
            if j >= 0 and (best is None or j < best[0]):
                best = (j, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        self.stopped_on = best[1]
        return best[1]

    def delta(self, final: bool) -> str:
        """New streamable text. When final, flushes everything, including held-back text and any
        bytes that never completed a character (decoded the way a full decode would)."""
        if final and self.stopped_on is None:
            self.text = self._decode(self.ids)
            self.read = len(self.ids)
        end = len(self.text) if final or self.stopped_on is not None else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
