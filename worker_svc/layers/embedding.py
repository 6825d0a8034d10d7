"""Token embedding and LM head split by vocabulary: each rank holds a contiguous slice of rows.

Every rank holds the same number of rows, a multiple of 4 when the vocabulary is split (the last
rank padded with zeros): gathered logits line up and only need the padding cut off, and each shard
starts on a group of 4 entries of the sampling kernel's noise (sampling_kernel.sample_shard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers.linear import matmul
from worker_svc.layers.parallel import all_reduce, gather_last_dim, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size, self.tp_size = vocab_size, tp_size()
        self.rows = -(-vocab_size // self.tp_size)
        if self.tp_size > 1:
            self.rows = -(-self.rows // 4) * 4
        self.start = tp_rank() * self.rows
        self.valid = max(0, min(self.rows, vocab_size - self.start))  # rows that are not padding
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        mine = loaded[self.start : self.start + self.rows]
        param.data[: mine.size(0)].copy_(mine)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids of other ranks' rows look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.start) & (input_ids < self.start + self.rows)
        out = F.embedding((input_ids - self.start) * mine, self.weight)
        return all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits [S, rows]: vocabulary entries [start, start + valid), then padding."""
        return matmul(hidden, self.weight)

    def gather(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `forward` logits joined into [S, vocab] on rank 0; None on the other ranks."""
        full = gather_last_dim(logits)
        return full[:, : self.vocab_size] if full is not None else None
