"""CUDA graphs for steps, replayed on static buffers: decode steps by batch size, prefill and mixed
steps by token count and sequence count.

A step launches a few hundred small kernels, and launching them one by one from Python costs the
host far more than the device spends on a short step (a 256-token prefill: about 20 ms of launches
for under 2 ms of work), so every arriving prompt would stall the running streams that long.
Replaying a captured graph is one launch. Each kernel's grid depends only on the graph's shape:
decode attention's split count is sized for the max model length, and prefill attention's query
tiles for the shape's token count over its seq count; the kernels read each seq's real span and
length on the device, so the tiles past a seq's end, and the seqs past the step's, exit at once.
Padding tokens store nothing (slot -1) and belong to no seq; their rows of the output go unread.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from worker_svc.attention import AttnMetadata
from worker_svc.batch import Batch

FIRST_PREFILL_TOKENS = 16  # the smallest prefill graph: a step of fewer tokens pads to it


class Shape(NamedTuple):
    tokens: int
    seqs: int
    decode: bool  # one token a seq: the decode kernels (tokens == seqs)


def decode_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return [*sizes, max_bs]


def prefill_tokens(max_tokens: int) -> list[int]:
    """Token counts of the prefill graphs: doubling from 16 to 256, then every 128 to 1024, then
    every 256, and max_tokens. A step pays for its shape's padding in every matmul, so the steps
    between the larger counts stay under a quarter of the count."""
    sizes, t = [], FIRST_PREFILL_TOKENS
    while t < max_tokens:
        sizes.append(t)
        t += t if t < 256 else 128 if t < 1024 else 256
    return [*sizes, max_tokens] if max_tokens >= FIRST_PREFILL_TOKENS else []


def prefill_shapes(max_tokens: int, max_seqs: int) -> list[Shape]:
    """Each token count with seq counts growing fourfold from 1 up to min(tokens, max_seqs): a step
    replays the smallest shape that holds it, and a shape with fewer seqs launches fewer attention
    programs that find no seq to work on."""
    shapes = []
    for t in prefill_tokens(max_tokens):
        cap = min(t, max_seqs)
        seqs = [4**i for i in range(cap.bit_length()) if 4**i < cap]
        shapes += [Shape(t, s, False) for s in [*seqs, cap]]
    return shapes


class StepGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_bs: int,
        max_prefill_tokens: int,
        max_blocks: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        """Decode graphs for 1..max_bs seqs; prefill graphs for steps of up to max_prefill_tokens
        tokens over up to max_bs seqs (0: none)."""
        self.model = model
        self.max_model_len = max_model_len
        self.decode = [Shape(bs, bs, True) for bs in decode_sizes(max_bs)]
        self.prefill = prefill_shapes(max_prefill_tokens, max_bs)
        tokens = max(max_bs, max_prefill_tokens)
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(tokens, dtype=i64, device=device)
        self.positions = torch.zeros(tokens, dtype=i64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=i32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=i32, device=device)
        self.query_start_loc = torch.zeros(max_bs + 1, dtype=i32, device=device)  # prefill: every seq empty
        self.rows = torch.arange(max_bs + 1, dtype=i32, device=device)  # decode's query_start_loc, padding's order
        self.order = self.rows[:max_bs].clone()
        self.graphs: dict[Shape, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Shape, torch.Tensor] = {}
        self.pool: tuple[int, int] | None = None  # the graphs' memory pool, once captured

    def _meta(self, shape: Shape) -> AttnMetadata:
        t, s = shape.tokens, shape.seqs
        return AttnMetadata(
            slot_mapping=self.slot_mapping[:t],
            query_start_loc=self.rows[: s + 1] if shape.decode else self.query_start_loc[: s + 1],
            seq_lens=self.seq_lens[:s],
            block_tables=self.block_tables[:s],
            max_query_len=1 if shape.decode else t,  # a bound: the kernels read the real spans
            max_seq_len=self.max_model_len,  # a bound too
            query_start_loc_host=[],  # change at every replay: no launch may depend on them
            seq_lens_host=[],
            is_decode=shape.decode,
            has_prefix=True,  # prefill reads the cache, which then holds this step's K/V too
            decode_order=self.order[:s] if shape.decode else None,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest shapes first so the smaller ones reuse their memory pool."""
        pool = None
        for shape in sorted([*self.decode, *self.prefill], key=lambda s: (s.tokens, s.seqs), reverse=True):
            args = self.args(shape)
            self.model(*args)  # warm up: compile kernels, settle the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape] = self.model(*args)
            pool = graph.pool()
            self.graphs[shape] = graph
        self.pool = pool
        torch.cuda.synchronize()

    def pick(self, batch: Batch) -> Shape | None:
        """The smallest shape that holds the batch; None if none does (the step then runs eagerly)."""
        n, s = batch.input_ids.numel(), batch.meta.seq_lens.numel()
        shapes = self.decode if batch.meta.is_decode else self.prefill
        return next((shape for shape in shapes if shape.tokens >= n and shape.seqs >= s), None)

    def args(self, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """The model's arguments for a step of this shape: views of the static buffers."""
        return self.input_ids[: shape.tokens], self.positions[: shape.tokens], self._meta(shape)

    def load(self, batch: Batch, shape: Shape) -> None:
        """Copies the batch into the static buffers, padded to the shape."""
        n, s, m = batch.input_ids.numel(), batch.meta.seq_lens.numel(), batch.meta
        t = shape.tokens
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(m.slot_mapping)
        self.seq_lens[:s].copy_(m.seq_lens)
        self.block_tables[:s, : m.block_tables.size(1)].copy_(m.block_tables)
        if t > n:
            self.slot_mapping[n:t].fill_(-1)
        if shape.decode:
            self.order[:n].copy_(m.decode_order if m.decode_order is not None else self.rows[:n])
            if t > n:  # padding rows attend to one token of some block; after the real rows in the order
                self.seq_lens[n:t].fill_(1)
                self.order[n:t].copy_(self.rows[n:t])
        else:
            self.query_start_loc[: s + 1].copy_(m.query_start_loc)
            if shape.seqs > s:  # padding seqs: empty, after the real tokens
                self.query_start_loc[s + 1 : shape.seqs + 1].fill_(n)

    def run(self, batch: Batch, shape: Shape) -> torch.Tensor:
        """Hidden states of the batch, by replaying the shape's graph."""
        self.load(batch, shape)
        self.graphs[shape].replay()
        return self.outputs[shape][: batch.input_ids.numel()]

    def describe(self) -> str:
        decode = ", ".join(str(s.tokens) for s in self.decode)
        prefill = f"up to {self.prefill[-1].tokens} tokens ({len(self.prefill)} shapes)" if self.prefill else "none"
        return f"decode batch sizes {decode}; prefill and mixed steps {prefill}"
