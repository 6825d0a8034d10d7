"""Structured output on the worker: the scheduler's token bitmasks applied to the logits.

The scheduler's engine core holds each constrained sequence's grammar and sends the bitmask of its
next token with the step that samples it (worker.proto, StepRequest.masks). Here the disallowed
tokens' logits become -inf before any sampling stage, so every stage and both draws (the torch
race and the Triton kernel, whole rows or vocabulary shards) only ever see allowed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.seq_state import SeqState


@dataclass(frozen=True)
class Masks:
    """One step's bitmasks: row i (int32 words, bit j of word w allows token 32 w + j) is seq_ids[i]'s."""

    seq_ids: list[int]
    words: np.ndarray  # int32 [len(seq_ids), ceil(vocab / 32)]

    @staticmethod
    def parse(seq_ids: list[int], data: bytes) -> Masks | None:
        if not seq_ids:
            return None
        words = np.frombuffer(data, dtype="<i4")
        if words.size % len(seq_ids):
            raise ValueError(f"{len(data)} bytes of masks do not split into {len(seq_ids)} rows")
        return Masks(seq_ids, words.reshape(len(seq_ids), -1))


def apply_masks(logits: torch.Tensor, seqs: list[SeqState], masks: Masks, offset: int = 0) -> None:
    """In place: -inf for every token a mask does not allow in its seq's row of logits [S, width],
    which holds vocabulary entries [offset, offset + width) (a tensor-parallel rank's shard)."""
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    rows = torch.tensor([index[s] for s in masks.seq_ids], dtype=torch.long)
    words = torch.from_numpy(masks.words.copy())
    if logits.device.type == "cuda":
        rows = rows.pin_memory().to(logits.device, non_blocking=True)
        words = words.pin_memory().to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(masks.seq_ids), -1).bool()
    width = logits.size(1)
    if allowed.size(1) < offset + width:  # a shard's padding past the vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, offset + width - allowed.size(1)))
    allowed = allowed[:, offset : offset + width]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
