"""Lays a step's sequences out as one flat batch of tokens for the model: ids, positions, cache
slots and attention metadata.

Everything is built with numpy into one pinned host buffer and moved with one asynchronous copy:
a copy from pageable memory would wait for the device to drain, and the worker relies on preparing
step N+1 while the device still runs step N.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.attention import AttnMetadata
from worker_svc.seq_state import SeqState

SMALL_DECODE = 32  # up to this many seqs, a pure decode step is laid out without numpy


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [T]: the pending tokens' entries are filled on the device
    positions: torch.Tensor  # int64 [T]: the token at index p of its seq has position p
    meta: AttnMetadata
    samplers: list[int]  # indices into the step's seqs of those that sample a token
    sample_rows: torch.Tensor  # int64: row in the flat batch of each sampler's last token
    fill_rows: torch.Tensor  # int64: rows whose token is a pending one ...
    fill_slots: torch.Tensor  # int64: ... found at these slots of the last-token buffer
    sample_slots: torch.Tensor  # int64: the last-token buffer slot of each sampler


class TableStore:
    """Every held seq's block table as row `slot` of one host array. Tables only grow, so each
    block id is converted once, when it first appears, and a step's tables are one numpy gather:
    converting every id of every seq each step took most of prepare()'s time at large batches."""

    def __init__(self, rows: int, max_blocks: int) -> None:
        self.array = np.zeros((rows, max_blocks), dtype=np.int64)

    def gather(self, seqs: list[SeqState], slot_of: np.ndarray, width: int) -> np.ndarray | None:
        """The seqs' tables, zero-padded to width; None when some seq has no slot or too many blocks."""
        if width > self.array.shape[1] or (slot_of < 0).any():
            return None
        for s in seqs:
            n = len(s.block_table)
            if s.synced_blocks < n:
                self.array[s.slot, s.synced_blocks : n] = s.block_table[s.synced_blocks :]
                s.synced_blocks = n
        return self.array[slot_of, :width]

    def clear(self, seq: SeqState) -> None:
        """Zeroes seq's row before its slot goes to another seq, so rows stay zero-padded."""
        if seq.slot >= 0:
            self.array[seq.slot, : seq.synced_blocks] = 0
        seq.synced_blocks = 0


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts copying a device tensor to the host without waiting: into pinned memory, since a
    copy into pageable memory would block until the device is done."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def step_done() -> torch.cuda.Event:
    """An event recorded after the work queued so far on the current stream. Blocking: whoever waits
    on it (the watcher, `collect`) sleeps until the step ends instead of spinning a core beside the
    thread that launches the next step."""
    done = torch.cuda.Event(blocking=True)
    done.record()
    return done


def upload(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor on device without a device sync: the copy to a GPU starts from pinned memory
    (from pageable memory it would first wait for all queued device work)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 arrays -> device tensors, through one pinned buffer and one non-blocking copy."""
    sizes = [a.size for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
    flat = host.numpy()
    start = 0
    for a, n in zip(arrays, sizes, strict=True):
        flat[start : start + n] = a.reshape(-1)
        start += n
    return _split(host.to(device, non_blocking=True), [a.shape for a in arrays])


def _split(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]


def prepare(
    seqs: list[SeqState],
    num_tokens: list[int],
    block_size: int,
    max_model_len: int,
    device: torch.device,
    store: TableStore | None = None,
) -> Batch:
    """Batch for computing num_tokens[i] tokens of seqs[i] from its num_computed on.

    This runs every step for up to hundreds of seqs, so each per-seq quantity is gathered once into
    an array and the rest is vectorised. `store` (the runner's) saves re-reading the block tables."""
    n = len(seqs)
    if len(num_tokens) != n or not seqs:
        raise ValueError(f"need one token count per seq and at least one seq; got {len(num_tokens)} for {n}")
    if n <= SMALL_DECODE and all(c == 1 for c in num_tokens):
        batch = _prepare_small_decode(seqs, block_size, max_model_len, device)
        if batch is not None:
            return batch
    counts = np.asarray(num_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=n)
    known = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=n)
    totals = known + np.fromiter((s.num_pending for s in seqs), dtype=np.int64, count=n)
    widths = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=n)
    slot_of = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=n)
    ends = starts + counts
    _check(seqs, counts, starts, ends, totals, known, widths * block_size, slot_of, max_model_len)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    total = int(cu[-1])
    row = np.repeat(np.arange(n), counts)
    positions = np.arange(total) - np.repeat(cu[:-1] - starts, counts)
    width = int(widths.max())
    tables = store.gather(seqs, slot_of, width) if store is not None else None
    if tables is None:
        tables = np.zeros((n, width), dtype=np.int64)
        tables[np.arange(width) < widths[:, None]] = np.fromiter(
            itertools.chain.from_iterable(s.block_table for s in seqs), dtype=np.int64, count=int(widths.sum())
        )
    slots = tables[row, positions // block_size] * block_size + positions % block_size
    # The last token of a range past the known ones was sampled on the device and is still there
    # (the range may start past `known` too, when several steps are in flight).
    fill = ends > known
    known_ends = np.minimum(ends, known)
    ids = itertools.chain.from_iterable(
        s.token_ids[a:b] if b > a + 1 else (s.token_ids[a],) if b > a else ()
        for s, a, b in zip(seqs, starts.tolist(), known_ends.tolist(), strict=True)
    )
    input_ids = np.zeros(total, dtype=np.int64)
    input_ids[np.arange(total) < np.repeat(cu[:-1] + known_ends - starts, counts)] = np.fromiter(ids, dtype=np.int64)
    samplers = np.flatnonzero(ends == totals)
    is_decode = bool((counts == 1).all())
    host = [input_ids, positions, slots, cu, ends, tables, cu[1:][samplers] - 1, cu[1:][fill] - 1, slot_of[fill]]
    host += [slot_of[samplers], np.argsort(-ends, kind="stable") if is_decode else ends[:0]]
    ids_d, pos, slot_map, loc, lens, tabs, rows, frows, fslots, sslots, order = to_device(host, device)
    meta = AttnMetadata(
        slot_mapping=slot_map,
        query_start_loc=loc.int(),
        seq_lens=lens.int(),
        block_tables=tabs.int(),
        max_query_len=int(counts.max()),
        max_seq_len=int(ends.max()),
        query_start_loc_host=cu.tolist(),
        seq_lens_host=ends.tolist(),
        is_decode=is_decode,
        has_prefix=bool(starts.any()),
        decode_order=order.int() if is_decode else None,
    )
    return Batch(ids_d, pos, meta, samplers.tolist(), rows, frows, fslots, sslots)


def _prepare_small_decode(
    seqs: list[SeqState], block_size: int, max_model_len: int, device: torch.device
) -> Batch | None:
    """`prepare` for a few seqs computing one token each, in plain Python: at this size numpy's
    per-call cost is most of the step's host time (single-request latency is bound by it). The
    same layout as `prepare`; None if some seq breaks a rule, for `prepare` to say which."""
    n = len(seqs)
    width = max(len(s.block_table) for s in seqs)
    ids, positions, slots, ends, tables = [], [], [], [], []
    samplers, sample_slots, fill_rows, fill_slots = [], [], [], []
    for i, s in enumerate(seqs):
        pos, known, table = s.num_computed, len(s.token_ids), s.block_table
        end, total = pos + 1, known + s.num_pending
        if end > total or end > max_model_len or end > len(table) * block_size:
            return None
        if end > known:  # sampled by the last step, still on the device only
            if end != total or s.slot < 0:
                return None
            fill_rows.append(i)
            fill_slots.append(s.slot)
            ids.append(0)
        else:
            ids.append(s.token_ids[pos])
        if end == total:
            samplers.append(i)
            sample_slots.append(s.slot)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        ends.append(end)
        tables += table
        tables += [0] * (width - len(table))
    loc = list(range(n + 1))
    order = sorted(range(n), key=ends.__getitem__, reverse=True)  # stable: as prepare's argsort
    parts = (ids, positions, slots, loc, ends, tables, samplers, fill_rows, fill_slots, sample_slots, order)
    shapes = [(len(p),) for p in parts]
    shapes[5] = (n, width)
    host = torch.tensor(list(itertools.chain.from_iterable(parts)), dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # an asynchronous copy needs pinned memory
    ids_d, pos, slot_map, loc_d, lens, tabs, rows, frows, fslots, sslots, order_d = _split(
        host.to(device, non_blocking=True), shapes
    )
    meta = AttnMetadata(
        slot_mapping=slot_map,
        query_start_loc=loc_d.int(),
        seq_lens=lens.int(),
        block_tables=tabs.int(),
        max_query_len=1,
        max_seq_len=max(ends),
        query_start_loc_host=loc,
        seq_lens_host=ends,
        is_decode=True,
        has_prefix=any(positions),
        decode_order=order_d.int(),
    )
    return Batch(ids_d, pos, meta, samplers, rows, frows, fslots, sslots)


def _check(
    seqs: list[SeqState],
    counts: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    totals: np.ndarray,
    known: np.ndarray,
    capacity: np.ndarray,
    slot_of: np.ndarray,
    max_model_len: int,
) -> None:
    problems: tuple[tuple[np.ndarray, Callable[[SeqState, int, int], str]], ...] = (
        (
            (counts < 1) | (ends > totals),
            lambda s, n, e: f"cannot compute {n} tokens from {s.num_computed} of {s.num_tokens}",
        ),
        (ends > max_model_len, lambda s, n, e: f"{e} tokens exceed max_model_len {max_model_len}"),
        (ends > capacity, lambda s, n, e: f"{len(s.block_table)} blocks cannot hold {e} tokens"),
        (
            # Tokens past the known ones were sampled on the device; only the newest is still in the
            # seq's last-token slot, so a range may reach past `known` only to end on that one, and
            # the ones in between must already be computed (they were fed by earlier steps).
            (ends > known) & ((ends != totals) | (np.maximum(starts, known) < ends - 1) | (slot_of < 0)),
            lambda s, n, e: "of the tokens still on the device only the newest can be fed",
        ),
    )
    for bad, message in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"seq {seqs[i].seq_id}: {message(seqs[i], int(counts[i]), int(ends[i]))}")
