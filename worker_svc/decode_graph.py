"""Decode steps of a few plain sequences in three CUDA calls: one copy in, one graph, one copy out.

A single stream's step is short enough that the host's share shows. The general path (batch.py,
then StepGraphs) spends about thirty CUDA calls around its graph: the batch's copy and int32
conversions, copies into the static inputs, the pending tokens' gather, the LM head, the sampler's
upload and kernels, the new tokens' scatter. Each is a launch, and each lets the worker's other
threads take the GIL. Here the step's inputs are written into a pinned copy of one device buffer
and sent in one copy, and one graph per batch size feeds every seq the token the last step sampled
for it, runs the model, draws the new tokens with the one-pass sampling kernel and keeps them in
the runner's last-token buffer for the next step.

The two copies stay off the graph's stream, so consecutive graphs run back to back on the device.
There are SETS device input buffers, each with its own graphs and its own buffer of new tokens,
used in turn: a step's inputs are copied (on a copy stream) into the set the step before does not
read, while that step runs, and its tokens are read back (on a read stream) while the next step
runs. Events order each set's uses: its inputs are rewritten once the graph that last read them
is done, and its graph runs once the last read-back of its tokens is. The token buffers live
outside the graphs' memory pool, which the general path's graphs share: one of those, replayed
before a read-back has run, could otherwise overwrite the tokens it reads.

A step qualifies when it is a pure decode of at most SMALL_DECODE seqs, on one rank, each feeding
the newest token (still on the device) and sampling the next with the kernel alone (no penalties,
filters, logit bias, min_tokens, logprobs or grammar). Anything else takes the general path.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from worker_svc.attention import AttnMetadata
from worker_svc.batch import SMALL_DECODE, step_done, to_host
from worker_svc.cuda_graph import decode_sizes
from worker_svc.sampler import Sampler
from worker_svc.seq_state import SeqState

RING = 4  # pinned copies of the inputs, reused in turn once their copy to the device is done
SETS = 2  # device inputs, graphs and token buffers used in turn (above)
Launched = tuple[torch.Tensor, torch.cuda.Event | None]  # new tokens (pinned, arriving), an event after them


class Draw(Protocol):
    """Draws a token a row from (logits, temperatures, seeds) into `out` and returns it
    (sampling_kernel.sample_tokens)."""

    def __call__(
        self, logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, /, *, out: torch.Tensor
    ) -> torch.Tensor: ...


class Inputs:
    """Typed views at fixed offsets of one byte buffer. The block tables come last, so a step of
    `rows` rows needs only the buffer's first `end(rows)` bytes."""

    FIELDS = (  # name, dtype, columns (0: max_blocks)
        ("fill", torch.int64, 1),  # the last-token slot holding each row's input token
        ("positions", torch.int64, 1),
        ("slots", torch.int64, 1),  # the cache slot each row's K/V goes to
        ("seeds", torch.int64, 1),
        ("sample_slots", torch.int64, 1),  # where each row's new token is kept
        ("seq_lens", torch.int32, 1),
        ("order", torch.int32, 1),  # rows longest first, as prepare() orders decode attention
        ("temps", torch.float32, 1),
        ("block_tables", torch.int32, 0),
    )

    def __init__(self, rows: int, max_blocks: int, device: torch.device, pin: bool = False) -> None:
        self.max_blocks, self.views = max_blocks, {}
        shapes = [(rows, max_blocks) if cols == 0 else (rows,) for _, _, cols in self.FIELDS]
        # Each field 16-byte aligned, as Triton specialises kernels on their pointers' alignment.
        sizes = [
            -(-math.prod(shape) * dtype.itemsize // 16) * 16
            for shape, (_, dtype, _) in zip(shapes, self.FIELDS, strict=True)
        ]
        self.buffer = torch.zeros(sum(sizes), dtype=torch.uint8, device=device, pin_memory=pin)
        start = 0
        for (name, dtype, _), shape, size in zip(self.FIELDS, shapes, sizes, strict=True):
            used = math.prod(shape) * dtype.itemsize
            self.views[name] = self.buffer[start : start + used].view(dtype).view(shape)
            start += size
        self.table_offset = start - sizes[-1]

    def end(self, rows: int) -> int:
        return self.table_offset + rows * self.max_blocks * 4

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        draw: Draw,
        sampler: Sampler,
        vocab: int,
        last_tokens: torch.Tensor,
        max_bs: int,
        max_blocks: int,
        block_size: int,
        max_model_len: int,
    ) -> None:
        """last_tokens: the runner's buffer of each held seq's last sampled token, with one entry
        past the slots it hands out, for padding rows to write."""
        self.model, self.draw, self.sampler, self.vocab = model, draw, sampler, vocab
        self.last_tokens, self.scratch = last_tokens, len(last_tokens) - 1
        self.block_size, self.max_model_len = block_size, max_model_len
        self.sizes = decode_sizes(min(max_bs, SMALL_DECODE))
        rows, device = self.sizes[-1], last_tokens.device
        self.devs = [Inputs(rows, max_blocks, device) for _ in range(SETS)]
        self.tokens = [torch.zeros(rows, dtype=torch.int64, device=device) for _ in range(SETS)]
        cpu, self.cuda = torch.device("cpu"), device.type == "cuda"
        self.host = [Inputs(rows, max_blocks, cpu, self.cuda) for _ in range(RING)]
        self.host_np = [{name: h[name].numpy() for name, *_ in Inputs.FIELDS} for h in self.host]
        self.sent: list[torch.cuda.Event | None] = [None] * RING  # each host copy's last step, done
        self.turn, self.set = 0, 0  # the next step's host copy and device set
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, set) -> graph
        if self.cuda:
            self.copy_stream, self.read_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
            for d, t in zip(self.devs, self.tokens, strict=True):  # freed only after those streams' work
                d.buffer.record_stream(self.copy_stream)
                t.record_stream(self.read_stream)
        self.used: list[torch.cuda.Event | None] = [None] * SETS  # after each set's last graph
        self.read: list[torch.cuda.Event | None] = [None] * SETS  # after each set's last read-back
        self._clear_device()

    def forward(self, rows: int, x: int) -> torch.Tensor:
        """The step on device set x's first `rows` rows: new tokens [rows] in the set's token buffer,
        and kept in last_tokens."""
        d = self.devs[x]
        meta = AttnMetadata(
            slot_mapping=d["slots"][:rows],
            query_start_loc=self.query_start_loc[: rows + 1],
            seq_lens=d["seq_lens"][:rows],
            block_tables=d["block_tables"][:rows],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # a bound: the kernels read the real lengths
            query_start_loc_host=[],
            seq_lens_host=[],
            is_decode=True,
            has_prefix=True,
            decode_order=d["order"][:rows],
        )
        ids = self.last_tokens.index_select(0, d["fill"][:rows])
        hidden = self.model(ids, d["positions"][:rows], meta)
        tokens = self.draw(
            self.model.compute_logits(hidden), d["temps"][:rows], d["seeds"][:rows], out=self.tokens[x][:rows]
        )
        self.last_tokens.index_copy_(0, d["sample_slots"][:rows], tokens)
        return tokens

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None) -> None:
        """One graph per batch size and device set, largest first, sharing `pool` (the step graphs')."""
        for rows in reversed(self.sizes):
            for x in range(SETS):
                self.forward(rows, x)  # warm up on padding rows: compile kernels, settle the allocator
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.forward(rows, x)
                pool = graph.pool()
                self.graphs[rows, x] = graph
        torch.cuda.synchronize()

    def _clear_device(self) -> None:
        """Every row a padding row: it reads and writes the scratch token and stores no K/V."""
        for d in self.devs:
            d["fill"].fill_(self.scratch)
            d["sample_slots"].fill_(self.scratch)
            d["slots"].fill_(-1)
            d["seq_lens"].fill_(1)
            d["order"].copy_(self.query_start_loc[:-1])

    def launch(
        self, seqs: list[SeqState], num_tokens: list[int]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None] | None:
        """Queues the step if it qualifies and advances the seqs as ModelRunner.launch does; None,
        with nothing queued, if it does not."""
        n = len(seqs)
        if n > self.sizes[-1] or any(c != 1 for c in num_tokens) or not self.sampler.one_pass(seqs, self.vocab):
            return None
        bs = self.block_size
        fill, positions, slots, ends, temps = [], [], [], [], []
        for s in seqs:
            pos, table = s.num_computed, s.block_table
            end = pos + 1
            if (
                pos != s.held  # the input token's value is not (or no longer) in the seq's slot
                or end != len(s.token_ids) + s.num_pending  # the step must sample the seq's next token
                or s.matcher is not None
                or end > self.max_model_len
                or end > len(table) * bs
            ):
                return None
            fill.append(s.slot)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            ends.append(end)
            temps.append(s.sampling.temperature)
        rows = next(r for r in self.sizes if r >= n)
        pad = rows - n
        turn, self.turn = self.turn, (self.turn + 1) % RING
        if (sent := self.sent[turn]) is not None:
            sent.synchronize()  # this host copy's last step is done (in practice, long since)
        h = self.host_np[turn]
        h["fill"][:rows] = h["sample_slots"][:rows] = fill + [self.scratch] * pad
        h["positions"][:rows] = positions + [0] * pad
        h["slots"][:rows] = slots + [-1] * pad
        h["seeds"][:n] = self.sampler.row_seeds(seqs)
        h["seeds"][n:rows] = 0
        h["seq_lens"][:rows] = ends + [1] * pad
        h["order"][:rows] = sorted(range(n), key=ends.__getitem__, reverse=True) + list(range(n, rows))
        h["temps"][:rows] = temps + [0.0] * pad
        tables = h["block_tables"]
        for i, (s, p) in enumerate(zip(seqs, positions, strict=True)):
            tables[i, : p // bs + 1] = s.block_table[: p // bs + 1]  # the blocks up to the new token's
        tables[n:rows, 0] = 0  # padding rows attend to one token of block 0
        x, self.set = self.set, (self.set + 1) % SETS
        inputs = self.host[turn].buffer[: self.devs[x].end(rows)]
        done = None
        if (rows, x) in self.graphs:
            tokens, done = self._replay(rows, x, n, inputs)
            self.sent[turn] = done
        else:  # not captured (on the CPU): the same work, eagerly
            self.devs[x].buffer[: len(inputs)].copy_(inputs)
            tokens = self.forward(rows, x)[:n].clone()
            if self.cuda:
                done = self.sent[turn] = step_done()
        for s in seqs:
            s.num_computed += 1
            s.held = s.num_tokens
            s.num_pending += 1
        return tokens, done

    def _replay(self, rows: int, x: int, n: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Set x's graph of `rows` rows on `inputs`, between its copies (see the module's docstring):
        (the first n new tokens, pinned and arriving; an event after their read-back)."""
        main = torch.cuda.current_stream()
        if (used := self.used[x]) is not None:
            self.copy_stream.wait_event(used)
        with torch.cuda.stream(self.copy_stream):
            self.devs[x].buffer[: len(inputs)].copy_(inputs, non_blocking=True)
        main.wait_stream(self.copy_stream)
        if (read := self.read[x]) is not None:
            main.wait_event(read)
        self.graphs[rows, x].replay()
        self.used[x] = used = main.record_event()
        self.read_stream.wait_event(used)
        with torch.cuda.stream(self.read_stream):
            tokens = to_host(self.tokens[x][:n])
            self.read[x] = done = step_done()
        return tokens, done
