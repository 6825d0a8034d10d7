"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed on static buffers.

A decode step launches a few hundred small kernels; replaying them as one graph removes the launch
gaps between them. The attention kernels' grids depend only on the bucket size and on the max
model length (their split count is sized for it), so one capture serves every context length.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_svc.attention import AttnMetadata
from worker_svc.batch import Batch


def bucket_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return [*sizes, max_bs]


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, max_bs: int, max_blocks: int, max_model_len: int, device: torch.device
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.sizes = bucket_sizes(max_bs)
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(max_bs, dtype=i64, device=device)
        self.positions = torch.zeros(max_bs, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=i32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=i32, device=device)
        self.rows = torch.arange(max_bs, dtype=i32, device=device)  # padding rows' place in the order
        self.order = self.rows.clone()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bs: int) -> AttnMetadata:
        return AttnMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # a bound: the kernels read the real lengths
            query_start_loc_host=list(range(bs + 1)),
            seq_lens_host=[self.max_model_len] * bs,
            is_decode=True,
            has_prefix=True,
            decode_order=self.order[:bs],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest bucket first so the smaller ones reuse its memory pool."""
        pool = None
        for bs in reversed(self.sizes):
            args = (self.input_ids[:bs], self.positions[:bs], self._meta(bs))
            self.model(*args)  # warm up: compile kernels, settle the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, batch: Batch) -> bool:
        return batch.meta.is_decode and batch.input_ids.numel() <= self.sizes[-1]

    def run(self, batch: Batch) -> torch.Tensor:
        """Hidden states of a decode batch, by replaying the smallest bucket that holds it."""
        n = batch.input_ids.numel()
        bs = next(s for s in self.sizes if s >= n)
        m = batch.meta
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.seq_lens[:n].copy_(m.seq_lens)
        width = m.block_tables.size(1)
        self.block_tables[:n, :width].copy_(m.block_tables)
        self.order[:n].copy_(m.decode_order if m.decode_order is not None else self.rows[:n])
        if bs > n:  # padding rows: store nothing, attend to one token of block 0, results unused
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.order[n:bs].copy_(self.rows[n:bs])  # after the real rows; never an index past bs
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
