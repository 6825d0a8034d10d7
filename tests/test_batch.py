"""The small-decode layout (plain Python) against the vectorised one: same batch, same errors."""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
import torch

import worker_svc.batch as batch_mod
from worker_svc.batch import Batch, TableStore, prepare
from worker_svc.seq_state import SamplingOptions, SeqState

BS = 4


def decode_seqs(rng: random.Random, n: int) -> list[SeqState]:
    """Seqs at one decode token each: some with the token known, some with it still on the device."""
    seqs = []
    for i in range(n):
        length = rng.randint(1, 40)
        pending = rng.random() < 0.5
        known = length - 1 if pending else length
        computed = length - 1
        blocks = rng.sample(range(1000), -(-length // BS) + rng.randint(0, 2))
        seq = SeqState(i, [rng.randrange(500) for _ in range(known)], 1, computed, blocks, SamplingOptions())
        seq.num_pending, seq.slot = int(pending), 2 * i + 1
        seqs.append(seq)
    return seqs


def as_dict(b: Batch) -> dict:
    out = {}
    for f in fields(b):
        value = getattr(b, f.name)
        if f.name == "meta":
            out |= {f"meta.{g.name}": _plain(getattr(value, g.name)) for g in fields(value)}
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: object) -> object:
    return (str(value.dtype), value.tolist()) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_small_decode_layout_matches_the_vectorised_one(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        seqs = decode_seqs(rng, n)
        fast = as_dict(prepare(seqs, [1] * n, BS, 4096, torch.device("cpu")))
        monkeypatch.setattr(batch_mod, "SMALL_DECODE", 0)
        general = as_dict(prepare(seqs, [1] * n, BS, 4096, torch.device("cpu")))
        monkeypatch.undo()
        assert fast == general


def test_small_decode_reports_what_the_vectorised_check_reports() -> None:
    seq = SeqState(7, [1, 2, 3], 3, 3, [0], SamplingOptions())  # position 3 fits block 0 (4 slots)
    seq.num_pending, seq.slot = 1, 0
    prepare([seq], [1], BS, 4096, torch.device("cpu"))
    seq.num_computed = 4  # nothing left to compute
    with pytest.raises(ValueError, match="seq 7: cannot compute 1 tokens from 4 of 4"):
        prepare([seq], [1], BS, 4096, torch.device("cpu"))
    seq.num_computed, seq.num_pending, seq.token_ids = 4, 1, [1, 2, 3, 4]  # position 4 needs a second block
    with pytest.raises(ValueError, match="seq 7: 1 blocks cannot hold 5 tokens"):
        prepare([seq], [1], BS, 4096, torch.device("cpu"))


def test_table_store_gives_the_same_tables_as_reading_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seqs grow their tables between steps, leave, and their slots go to new seqs: the gathered
    tables stay equal to the ones read from the seqs themselves, zero-padded."""
    monkeypatch.setattr(batch_mod, "SMALL_DECODE", 0)  # the vectorised layout, which uses the store
    rng = random.Random(3)
    store = TableStore(rows=64, max_blocks=16)
    free = list(range(64))
    held: list[SeqState] = []
    for step in range(40):
        for seq in rng.sample(held, k=len(held) // 4):  # some finish; their slots are reused
            held.remove(seq)
            store.clear(seq)
            free.append(seq.slot)
            seq.slot = -1
        for seq in decode_seqs(rng, rng.randint(1, 6)):
            seq.seq_id, seq.slot = 1000 * step + seq.seq_id, free.pop(rng.randrange(len(free)))
            held.append(seq)
        for seq in held:  # the next decode token; sometimes it needs a new block
            if seq.num_computed + 2 > len(seq.block_table) * BS:
                seq.block_table.append(rng.randrange(1000))
            seq.token_ids.append(rng.randrange(500))
            seq.num_computed += 1
        order = rng.sample(held, k=len(held))
        with_store = prepare(order, [1] * len(order), BS, 4096, torch.device("cpu"), store)
        without = prepare(order, [1] * len(order), BS, 4096, torch.device("cpu"))
        assert as_dict(with_store) == as_dict(without)


@pytest.mark.parametrize("n", [3, 40])  # the small-decode layout and the vectorised one
def test_decode_steps_order_their_rows_longest_context_first(n: int) -> None:
    seqs = decode_seqs(random.Random(n), n)
    meta = prepare(seqs, [1] * n, BS, 4096, torch.device("cpu")).meta
    assert meta.decode_order is not None and meta.decode_order.dtype == torch.int32
    order, lens = meta.decode_order.tolist(), meta.seq_lens.tolist()
    assert sorted(order) == list(range(n))  # every row once
    assert order == sorted(range(n), key=lambda i: (-lens[i], i))  # longest first, ties in batch order
    prompt = SeqState(99, [1] * 6, 6, 0, [5, 6], SamplingOptions())
    prompt.slot = 0
    assert prepare([prompt, *seqs[:2]], [6, 1, 1], BS, 4096, torch.device("cpu")).meta.decode_order is None
