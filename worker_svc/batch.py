"""Lays a step's sequences out as one flat batch of tokens for the model: ids, positions, cache
slots and attention metadata.

Everything is built with numpy into one pinned host buffer and moved with one asynchronous copy:
a copy from pageable memory would wait for the device to drain, and the worker relies on preparing
step N+1 while the device still runs step N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.attention import AttnMetadata
from worker_svc.seq_state import SeqState


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


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts copying a device tensor to the host without waiting: into pinned memory, since a
    copy into pageable memory would block until the device is done."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 arrays -> device tensors, through one pinned buffer and one non-blocking copy."""
    sizes = [a.size for a in arrays]
    pinned = device.type == "cuda"
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=pinned)
    flat = host.numpy()
    start = 0
    for a, n in zip(arrays, sizes, strict=True):
        flat[start : start + n] = a.reshape(-1)
        start += n
    dev = host.to(device, non_blocking=True)
    return [t.view(a.shape) for t, a in zip(dev.split(sizes), arrays, strict=True)]


def prepare(
    seqs: list[SeqState], num_tokens: list[int], block_size: int, max_model_len: int, device: torch.device
) -> Batch:
    """Batch for computing num_tokens[i] tokens of seqs[i] from its num_computed on."""
    counts = np.asarray(num_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=len(seqs))
    ends = starts + counts
    _check(seqs, counts, ends, block_size, max_model_len)
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    total = int(cu[-1])
    row = np.repeat(np.arange(len(seqs)), counts)
    positions = np.arange(total) - np.repeat(cu[:-1] - starts, counts)
    tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int64)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    slots = tables[row, positions // block_size] * block_size + positions % block_size
    input_ids = np.zeros(total, dtype=np.int64)
    fill_rows, fill_slots = [], []
    for i, s in enumerate(seqs):
        a, b, known = int(starts[i]), int(ends[i]), len(s.token_ids)
        if b > known:  # the last token of the range was sampled on the device and is still there
            fill_rows.append(int(cu[i + 1]) - 1)
            fill_slots.append(s.slot)
            b = known
        input_ids[cu[i] : cu[i] + b - a] = s.token_ids[a:b]
    samplers = [i for i, s in enumerate(seqs) if ends[i] == s.num_tokens]
    sample_rows = cu[1:][samplers] - 1
    sample_slots = np.asarray([seqs[i].slot for i in samplers])
    host = [input_ids, positions, slots, cu, ends, tables, sample_rows, np.asarray(fill_rows), np.asarray(fill_slots)]
    ids, pos, slot_map, loc, lens, tabs, rows, frows, fslots, sslots = to_device([*host, sample_slots], device)
    meta = AttnMetadata(
        slot_mapping=slot_map,
        query_start_loc=loc.int(),
        seq_lens=lens.int(),
        block_tables=tabs.int(),
        max_query_len=int(counts.max()),
        max_seq_len=int(ends.max()),
        query_start_loc_host=cu.tolist(),
        seq_lens_host=ends.tolist(),
        is_decode=bool((counts == 1).all()),
        has_prefix=bool(starts.any()),
    )
    return Batch(ids, pos, meta, samplers, rows, frows, fslots, sslots)


def _check(seqs: list[SeqState], counts: np.ndarray, ends: np.ndarray, block_size: int, max_model_len: int) -> None:
    if len(counts) != len(seqs) or not seqs:
        raise ValueError(f"need one token count per seq and at least one seq; got {len(counts)} for {len(seqs)}")
    for s, n, end in zip(seqs, counts.tolist(), ends.tolist(), strict=True):
        if n < 1 or end > s.num_tokens:
            raise ValueError(f"seq {s.seq_id}: cannot compute {n} tokens from {s.num_computed} of {s.num_tokens}")
        if end > max_model_len:
            raise ValueError(f"seq {s.seq_id}: {end} tokens exceed max_model_len {max_model_len}")
        if end > len(s.block_table) * block_size:
            raise ValueError(f"seq {s.seq_id}: {len(s.block_table)} blocks cannot hold {end} tokens")
        if end - 1 > len(s.token_ids) or (end > len(s.token_ids) and s.slot < 0):
            raise ValueError(f"seq {s.seq_id}: only its last token may still be on the device")
