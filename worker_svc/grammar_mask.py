"""Structured output on the worker: grammar bitmasks applied to the logits.

The disallowed tokens' logits become -inf before any sampling stage, so every stage and both draws
(the torch race and the Triton kernel, whole rows or vocabulary shards) only ever see allowed tokens.
"""

from __future__ import annotations

import torch


def apply_masks(logits: torch.Tensor, words: torch.Tensor, offset: int = 0) -> None:
    """In place: -inf for every token row i of the bitmask `words` (int32 [S, ceil(vocab / 32)], bit j
    of word w allows token 32 w + j) does not allow in row i of logits [S, width], which holds
    vocabulary entries [offset, offset + width) (a tensor-parallel rank's shard)."""
    words = words.to(logits.device, non_blocking=True)  # from pinned memory on CUDA: no wait
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(words.size(0), -1).bool()
    width = logits.size(1)
    if allowed.size(1) < offset + width:  # a shard's padding past the vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, offset + width - allowed.size(1)))
    logits.masked_fill_(~allowed[:, offset : offset + width], float("-inf"))
