"""KV cache events: what the prefix cache stored and evicted, for a gateway's cache-aware routing.

The block manager (in the engine core) records one event per block it registers or evicts; each
step's events reach the frontend with its StepOutputs. There `KvLog` numbers them in batches,
keeps a mirror of the live blocks and a bounded history, and feeds every subscriber: one that
starts from 0 gets the current state first (a Cleared, then every live block, parents first),
one that resumes gets the batches it missed while they are still in the history.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from scheduler_svc.errors import InvalidRequest, ReplayExpired


@dataclass(frozen=True)
class BlockStored:
    block_hash: int  # chained over every token before the block's end (block_manager.chain_hash)
    parent_hash: int | None  # the previous block's hash; None for a prompt's first block
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlockRemoved:
    block_hash: int


@dataclass(frozen=True)
class CacheCleared:
    pass


KvEvent = BlockStored | BlockRemoved | CacheCleared


@dataclass(frozen=True)
class KvBatch:
    sequence: int
    timestamp: float
    events: tuple[KvEvent, ...]


class KvLog:
    def __init__(self, history: int = 1 << 16, queue_size: int = 4096) -> None:
        """`history`: events kept for replay (a prefill-heavy step may store a thousand blocks, so
        whole batches are kept while their events fit); `queue_size`: batches a subscriber may lag."""
        self.sequence = 0  # of the last batch published
        self.live: dict[int, BlockStored] = {}  # insertion order: a parent before its children
        self.history: deque[KvBatch] = deque()
        self.max_history = history
        self.num_history = 0  # events in self.history
        self.queue_size = queue_size
        self.subscribers: set[asyncio.Queue[KvBatch | None]] = set()

    def publish(self, events: tuple[KvEvent, ...]) -> None:
        self.sequence += 1
        batch = KvBatch(self.sequence, time.time(), events)
        for e in events:
            if isinstance(e, BlockStored):
                self.live[e.block_hash] = e
            elif isinstance(e, BlockRemoved):
                self.live.pop(e.block_hash, None)
            else:
                self.live.clear()
        self.history.append(batch)
        self.num_history += len(events)
        while self.num_history > self.max_history and len(self.history) > 1:
            self.num_history -= len(self.history.popleft().events)
        for q in list(self.subscribers):
            if q.qsize() >= self.queue_size:
                self.subscribers.discard(q)
                q.put_nowait(None)  # tells its stream it lagged
            else:
                q.put_nowait(batch)

    def snapshot(self) -> KvBatch:
        """The live blocks as one batch numbered like the last one published, so live batches follow on."""
        return KvBatch(self.sequence, time.time(), (CacheCleared(), *self.live.values()))

    def subscribe(self, start: int) -> tuple[list[KvBatch], asyncio.Queue[KvBatch | None]]:
        """What to send first (snapshot or replay from `start`), and the queue of the batches after it."""
        if start == 0:
            first = [self.snapshot()]
        elif start > self.sequence + 1:
            raise InvalidRequest(f"start_sequence_number {start} is ahead of the last batch ({self.sequence})")
        elif (self.history and self.history[0].sequence <= start) or start == self.sequence + 1:
            first = [b for b in self.history if b.sequence >= start]
        else:
            raise ReplayExpired(f"batch {start} is no longer kept; subscribe from 0 for a snapshot")
        q: asyncio.Queue[KvBatch | None] = asyncio.Queue()
        self.subscribers.add(q)
        return first, q

    def unsubscribe(self, q: asyncio.Queue[KvBatch | None]) -> None:
        self.subscribers.discard(q)
