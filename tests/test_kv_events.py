"""The frontend's KV-event log: numbering, the live-block mirror, snapshots, replay and lagging subscribers."""

from __future__ import annotations

import pytest

from scheduler_svc.errors import InvalidRequest, ReplayExpired
from scheduler_svc.kv_events import BlockRemoved, BlockStored, CacheCleared, KvLog

A, B, C = BlockStored(1, None, (1, 2)), BlockStored(2, 1, (3, 4)), BlockStored(3, None, (9, 9))


def test_snapshot_holds_the_live_blocks_parents_first() -> None:
    log = KvLog()
    log.publish((A, B))
    log.publish((C, BlockRemoved(2)))
    snap = log.snapshot()
    assert (snap.sequence, snap.events) == (2, (CacheCleared(), A, C))
    log.publish((CacheCleared(),))
    assert log.snapshot().events == (CacheCleared(),)


def test_subscribe_from_zero_replay_and_live_batches() -> None:
    log = KvLog(history=2)  # events
    first, q = log.subscribe(0)
    assert [b.sequence for b in first] == [0] and first[0].events == (CacheCleared(),)
    for e in (A, B, C):
        log.publish((e,))
    assert [q.get_nowait().events for _ in range(3)] == [(A,), (B,), (C,)]
    replay, _ = log.subscribe(2)
    assert [b.sequence for b in replay] == [2, 3]
    assert log.subscribe(4)[0] == []  # caught up: live batches only
    with pytest.raises(ReplayExpired):
        log.subscribe(1)  # no longer in the history of 2 events
    with pytest.raises(InvalidRequest):
        log.subscribe(9)


def test_a_subscriber_that_lags_is_dropped_with_a_marker() -> None:
    log = KvLog(queue_size=2)
    _, q = log.subscribe(0)
    for e in (A, B, C):
        log.publish((e,))
    assert [q.get_nowait() for _ in range(3)][2] is None
    assert q not in log.subscribers
