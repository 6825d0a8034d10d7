"""What attention needs to know about a flat batch: where each sequence's new tokens sit in it,
how long each context is, and where in the paged KV cache every token lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset of each new token; -1: don't store
    query_start_loc: torch.Tensor  # int32 [S + 1]: cumulative new-token counts, so seq i is [loc[i], loc[i+1])
    seq_lens: torch.Tensor  # int32 [S]: context length of each seq, the new tokens included
    block_tables: torch.Tensor  # int32 [S, max_blocks]: each seq's blocks in order, padded with 0
    max_query_len: int  # in a step captured in a CUDA graph, this and max_seq_len are only bounds
    max_seq_len: int
    # Host copies of query_start_loc and seq_lens, so backends that loop on the host need no sync;
    # empty in a captured step, whose values change at every replay.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    is_decode: bool  # every seq has exactly one new token
    has_prefix: bool  # some seq attends to K/V stored by an earlier step (cached prefix, chunk, decode)
    # int32 [S], decode steps only: the seqs by context length, longest first, for the decode
    # kernel to start them in that order (4-9% faster at batch 48-256 on an H100: the long ones no
    # longer trail the launch). None: batch order.
    decode_order: torch.Tensor | None = None
