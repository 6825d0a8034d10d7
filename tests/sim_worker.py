"""A pure-Python stand-in for the worker, to test the scheduler without gRPC or torch.

It follows the real step protocol (removed, added, block growth, then the batch; it feeds its own
sampled tokens) and keeps a fake KV cache: each slot holds the (position, token) written there.
Before sampling it reads the whole context back through the block table and checks it, so a wrong
block table, a bad prefix-cache hit or a reused-too-early block fails loudly. The next token is a
fixed function of the context, so the expected output of any prompt is known without batching.
"""

from __future__ import annotations

from collections import deque

from scheduler_svc.scheduler import Batch, Scheduler

VOCAB = 1000


def next_token(context: list[int]) -> int:
    h = 0
    for t in context:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], n: int, stop_ids: set[int] = frozenset()) -> list[int]:
    ctx = list(prompt)
    out = []
    for _ in range(n):
        t = next_token(ctx)
        ctx.append(t)
        out.append(t)
        if t in stop_ids:
            break
    return out


class SimWorker:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.cache: dict[int, tuple[int, int]] = {}
        self.seqs: dict[int, dict] = {}

    def step(self, batch: Batch) -> dict[int, int]:
        for sid in batch.removed:
            self.seqs.pop(sid, None)
        for seq in batch.added:
            n = batch.num_tokens[batch.seqs.index(seq)]
            self.seqs[seq.seq_id] = {
                "tokens": list(seq.token_ids),
                "computed": seq.num_computed - n,
                "blocks": list(seq.block_table),
            }
        for sid, b in batch.new_blocks:
            self.seqs[sid]["blocks"].append(b)
        out = {}
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            st = self.seqs[seq.seq_id]
            bs = self.block_size
            for pos in range(st["computed"], st["computed"] + n):
                self.cache[st["blocks"][pos // bs] * bs + pos % bs] = (pos, st["tokens"][pos])
            st["computed"] += n
            if st["computed"] == len(st["tokens"]):
                ctx = []
                for pos in range(len(st["tokens"])):
                    got = self.cache.get(st["blocks"][pos // bs] * bs + pos % bs)
                    assert got == (pos, st["tokens"][pos]), f"seq {seq.seq_id} pos {pos}: cache has {got}"
                    ctx.append(got[1])
                t = next_token(ctx)
                st["tokens"].append(t)
                out[seq.seq_id] = t
        return out


def run(scheduler: Scheduler, worker: SimWorker, depth: int = 2, on_step=None, max_steps: int = 100_000) -> int:
    """Drives scheduler and worker to completion with up to `depth` steps in flight; returns steps."""
    inflight: deque[tuple[Batch, dict[int, int]]] = deque()
    steps = 0
    while scheduler.has_work() or inflight or scheduler.removed:
        while len(inflight) < depth:
            batch = scheduler.schedule()
            if batch is None:
                break
            inflight.append((batch, worker.step(batch)))
            steps += 1
        assert inflight, "scheduler has work but scheduled nothing"
        batch, sampled = inflight.popleft()
        scheduler.postprocess(batch, sampled)
        if on_step is not None:
            on_step(scheduler)
        assert steps < max_steps
    return steps
