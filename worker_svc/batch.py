"""Lays a step's sequences out as one flat batch of tokens for the model: ids, positions, cache
slots and attention metadata, built with numpy so the host work stays small at large batches."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.attention import AttnMetadata
from worker_svc.seq_state import SeqState


@dataclass
class Batch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]: the token at index p of its seq has position p
    meta: AttnMetadata
    samplers: list[int]  # indices into the step's seqs of those that sample a token
    sample_rows: torch.Tensor  # int64: row in the flat batch of each sampler's last token


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
    tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    slots = tables[row, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ids = itertools.chain.from_iterable(s.token_ids[a:b] for s, a, b in zip(seqs, starts, ends, strict=True))
    input_ids = np.fromiter(ids, dtype=np.int64, count=total)
    samplers = [i for i, s in enumerate(seqs) if ends[i] == len(s.token_ids)]

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    meta = AttnMetadata(
        slot_mapping=put(slots),
        query_start_loc=put(cu.astype(np.int32)),
        seq_lens=put(ends.astype(np.int32)),
        block_tables=put(tables),
        max_query_len=int(counts.max()),
        max_seq_len=int(ends.max()),
        query_start_loc_host=cu.tolist(),
        seq_lens_host=ends.tolist(),
        is_decode=bool((counts == 1).all()),
        has_prefix=bool(starts.any()),
    )
    return Batch(put(input_ids), put(positions), meta, samplers, put(cu[1:][samplers] - 1))


def _check(seqs: list[SeqState], counts: np.ndarray, ends: np.ndarray, block_size: int, max_model_len: int) -> None:
    if len(counts) != len(seqs) or not seqs:
        raise ValueError(f"need one token count per seq and at least one seq; got {len(counts)} for {len(seqs)}")
    for s, n, end in zip(seqs, counts.tolist(), ends.tolist(), strict=True):
        if n < 1 or end > len(s.token_ids):
            raise ValueError(f"seq {s.seq_id}: cannot compute {n} tokens from {s.num_computed} of {len(s.token_ids)}")
        if end > max_model_len:
            raise ValueError(f"seq {s.seq_id}: {end} tokens exceed max_model_len {max_model_len}")
        if end > len(s.block_table) * block_size:
            raise ValueError(f"seq {s.seq_id}: {len(s.block_table)} blocks cannot hold {end} tokens")
