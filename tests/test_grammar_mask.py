"""The worker's side of structured output: bitmasks applied to whole rows and to vocabulary shards."""

from __future__ import annotations

import numpy as np
import torch

from worker_svc.grammar_mask import apply_masks
from worker_svc.sampler import Sampler
from worker_svc.seq_state import SamplingOptions, SeqState

VOCAB = 100


def seqs(n: int) -> list[SeqState]:
    return [SeqState(10 + i, [1, 2], 2, 2, [0], SamplingOptions(temperature=1.0)) for i in range(n)]


def bitmask(allowed: list[set[int] | None]) -> torch.Tensor:
    """xgrammar's layout: bit j of int32 word w allows token 32 w + j; None allows every token."""
    words = np.zeros((len(allowed), -(-VOCAB // 32)), dtype="<u4")
    for row, tokens in enumerate(allowed):
        for t in range(VOCAB) if tokens is None else tokens:
            words[row, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(words.view("<i4"))


ALLOWED: list[set[int] | None] = [{5}, None, {0, 31, 32, 63, 99}]


def test_only_the_allowed_tokens_of_the_masked_rows_keep_their_logits() -> None:
    logits = torch.randn(3, VOCAB)
    want = logits.clone()
    apply_masks(logits, bitmask(ALLOWED))
    assert torch.equal(logits[1], want[1])  # row 1 may take any token
    for row, tokens in ((2, ALLOWED[2]), (0, ALLOWED[0])):
        assert tokens is not None
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == tokens and torch.equal(logits[row, sorted(tokens)], want[row, sorted(tokens)])


def test_each_shard_masks_its_own_slice_of_the_vocabulary() -> None:
    full = torch.randn(3, VOCAB)
    shards = [full[:, :52].clone(), torch.cat([full[:, 52:], torch.zeros(3, 4)], dim=1)]  # the last one padded
    masks = bitmask(ALLOWED)
    apply_masks(full, masks)
    for shard, offset in zip(shards, (0, 52), strict=True):
        apply_masks(shard, masks, offset)
    joined = torch.cat(shards, dim=1)
    assert torch.equal(joined[:, :VOCAB], full)
    assert torch.isinf(joined[[0, 2], VOCAB:]).all()  # padding past the vocabulary is never allowed


def test_sampled_tokens_stay_inside_the_mask() -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
    for step in range(50):
        logits = torch.randn(3, VOCAB) * 5
        apply_masks(logits, bitmask(ALLOWED))
        tokens, _ = sampler.sample(logits, seqs(3))
        assert tokens[2].item() in ALLOWED[2] and tokens[0].item() == 5, step
