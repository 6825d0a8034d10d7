"""KV block accounting: reference counts, a free list, and a prefix cache keyed by chained hashes.

A full block's hash covers its tokens and, through the previous block's hash, every token before
it, so equal hashes mean equal prefixes. Freed blocks keep their hash and stay reusable until the
free list hands them out again (least recently freed first).
"""

from __future__ import annotations

from array import array

import xxhash

from scheduler_svc.kv_events import BlockRemoved, BlockStored, CacheCleared, KvEvent
from scheduler_svc.sequence import Sequence


def chain_hash(prev: int, token_ids: list[int]) -> int:
    h = xxhash.xxh64(prev.to_bytes(8, "little"))
    h.update(array("I", token_ids).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.num_queries = 0  # prompt blocks looked up in the prefix cache
        self.num_hits = 0
        self.reset()
        # What the prefix cache stored and evicted since the core last took them (kv_events.py).
        self.events: list[KvEvent] = []

    def reset(self) -> None:
        """Every block free and nothing cached: the workers' KV cache is gone (a rank restarted).
        The sequences must have dropped their block tables (Scheduler.reset does). Events not yet
        taken would name blocks that no longer exist: one CacheCleared replaces them."""
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        # Insertion-ordered dict as an LRU set: the front is the least recently freed block.
        self.free: dict[int, None] = dict.fromkeys(range(self.num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.events = [CacheCleared()]

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def hashes(self, seq: Sequence) -> list[int]:
        """Extends and returns seq.block_hashes to cover every full block of its known tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq.token_ids) // bs):
            prev = seq.block_hashes[-1] if seq.block_hashes else 0
            seq.block_hashes.append(chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs]))
        return seq.block_hashes

    def match(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(seq.token_ids) - 1) // self.block_size
        hit: list[int] = []
        for h in self.hashes(seq)[:usable]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def admit_cost(self, hit: list[int], new_blocks: int) -> int:
        """Free blocks that admitting with this hit and this many new blocks would consume."""
        return new_blocks + sum(1 for b in hit if self.blocks[b].ref_count == 0)

    def admit(self, seq: Sequence, hit: list[int]) -> None:
        """Takes references on a matched prefix; seq starts computing after it."""
        assert not seq.block_table
        for block_id in hit:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(hit)
        seq.num_computed = len(hit) * self.block_size
        seq.num_committed_blocks = len(hit)
        if seq.num_cached_tokens == 0 and seq.num_output_tokens == 0:
            seq.num_cached_tokens = seq.num_computed
            self.num_queries += len(seq.token_ids) // self.block_size
            self.num_hits += len(hit)

    def grow(self, seq: Sequence, num_tokens: int) -> list[int] | None:
        """Appends blocks so seq can hold num_tokens; returns the new ids, or None if short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return None
        new = [self._take() for _ in range(max(need, 0))]
        seq.block_table.extend(new)
        return new

    def _take(self) -> int:
        block_id = next(iter(self.free))
        del self.free[block_id]
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its old contents from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
                self.events.append(BlockRemoved(block.hash))
            block.hash = None
        block.ref_count = 1
        return block_id

    def commit(self, seq: Sequence) -> None:
        """Registers full blocks whose K/V are computed (or scheduled) and whose tokens are known.

        Call it only after a step's result: a block registered now is reused at the earliest by the
        next scheduled step, which the worker runs after every step already sent.
        """
        if not self.enable_prefix_caching:
            return
        upto = min(seq.num_computed, len(seq.token_ids)) // self.block_size
        if upto <= seq.num_committed_blocks:
            return
        hashes = self.hashes(seq)
        bs = self.block_size
        for i in range(seq.num_committed_blocks, upto):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
                parent = hashes[i - 1] if i else None
                self.events.append(BlockStored(hashes[i], parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        seq.num_committed_blocks = upto

    def flush(self) -> bool:
        """Forgets every cached prefix, as long as no block is in use; returns whether it did."""
        if any(b.ref_count for b in self.blocks):
            return False
        for b in self.blocks:
            b.hash = None
        self.cached.clear()
        self.events.append(CacheCleared())
        return True

    def take_events(self) -> tuple[KvEvent, ...]:
        events, self.events = tuple(self.events), []
        return events

    def release(self, seq: Sequence) -> None:
        """Drops seq's references. Tail blocks are freed first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_committed_blocks = 0
