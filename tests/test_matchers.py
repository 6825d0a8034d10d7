"""The worker's grammar matchers (worker_svc/matchers.py) on the tiny model's tokenizer: the masks they
give, rebuilt from a sequence's known tokens, and what a worker without a tokenizer reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from proto import worker_pb2 as wpb
from worker_svc.matchers import Matchers
from worker_svc.seq_state import SamplingOptions, SeqState

PROMPT = [1, 2, 3]


def allowed(words: torch.Tensor, row: int, vocab: int) -> set[int]:
    bits = np.unpackbits(words[row].numpy().view(np.uint8), bitorder="little")[:vocab]
    return set(np.flatnonzero(bits).tolist())


def seq(seq_id: int, outputs: list[int]) -> SeqState:
    return SeqState(seq_id, PROMPT + outputs, len(PROMPT), 0, [0], SamplingOptions())


def test_masks_follow_the_tokens_and_a_matcher_is_rebuilt_from_known_ones(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = len(tok)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    matchers = Matchers.load(str(tiny_model_dir), vocab)
    assert matchers is not None
    grammar = wpb.Grammar(kind="regex", spec="[ab]b")
    fresh, resumed = seq(1, []), seq(2, [a])  # resumed: added again after a preemption, one token known
    for s in (fresh, resumed):
        matchers.start(s, grammar)
    words = matchers.masks([fresh, resumed], pinned=False)
    assert allowed(words, 0, vocab) == {a, b} | {t for t in range(vocab) if tok.decode([t]) == "ab"}
    assert allowed(words, 1, vocab) == {b}
    matchers.accept(fresh, a)
    matchers.accept(fresh, b)
    assert allowed(matchers.masks([fresh], pinned=False), 0, vocab) == {tok.eos_token_id}
    matchers.accept(fresh, tok.eos_token_id)
    assert fresh.matcher.is_terminated()
    assert (matchers.masks([fresh], pinned=False) == -1).all()  # its last tokens in flight: anything
    choice = seq(3, [])
    matchers.start(choice, wpb.Grammar(kind="choice", choices=["ab", "b"]))
    assert b in allowed(matchers.masks([choice], pinned=False), 0, vocab)
    with pytest.raises(ValueError, match="does not compile here"):
        matchers.start(seq(4, []), wpb.Grammar(kind="regex", spec="a(b"))


def test_without_a_tokenizer_structured_output_is_off(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert Matchers.load(str(tmp_path), 100) is None
