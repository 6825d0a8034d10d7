"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Pure Python: no gRPC, no torch. `schedule()` builds the next step; `postprocess()` takes the tokens
a step sampled. Steps may be scheduled before earlier ones return: a decode sequence then has a
token in flight, which the worker feeds to the next step itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import CoreConfig
from scheduler_svc.sequence import FinishReason, SeqStatus, Sequence


@dataclass
class Batch:
    """One step: the sequences to run and the events the worker applies first."""

    step_id: int
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # whether seqs[i] samples a token
    epochs: list[int] = field(default_factory=list)
    added: list[Sequence] = field(default_factory=list)  # new to the worker this step
    removed: list[int] = field(default_factory=list)
    new_blocks: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, block_id)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: CoreConfig, num_blocks: int, block_size: int, eos_token_ids: set[int]) -> None:
        """`config`'s limits are set: the core fills them in from the workers' (CoreConfig.within)."""
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            assert getattr(config, name) is not None, f"{name} is unset"
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.config, self.num_blocks, self.block_size = config, num_blocks, block_size
        self.eos_token_ids = eos_token_ids
        self.blocks = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.removed: list[int] = []  # worker state to drop with the next step
        self.num_steps = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert self.blocks.blocks_for(seq.max_len) <= self.num_blocks, "validated by the engine"
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        batch = Batch(step_id=self.num_steps)
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            todo = seq.num_tokens - seq.num_computed
            if todo == 1 and not seq.can_grow():
                i += 1  # its last token is in flight and will finish it
                continue
            n = min(todo, budget)
            new = self.blocks.grow(seq, seq.num_computed + n)
            while new is None:
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
                new = self.blocks.grow(seq, seq.num_computed + n)
            if new is None:
                break
            batch.new_blocks.extend((seq.seq_id, b) for b in new)
            self._put(batch, seq, n)
            budget -= n
            i += 1
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.leader is not None:
                if self.config.enable_prefix_caching and not seq.leader.prompt_cached:
                    break  # admitted once the leader's prompt blocks are cached: it then shares them
                seq.leader = None
            hit = self.blocks.match(seq)
            start = len(hit) * self.block_size
            n = min(seq.num_tokens - start, budget)
            need = self.blocks.blocks_for(start + n) - len(hit)
            if self.blocks.admit_cost(hit, need) > self.blocks.num_free:
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hit)
            self.blocks.grow(seq, start + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.added.append(seq)
            seq.on_worker = True
            self._put(batch, seq, n)
            budget -= n
        batch.removed, self.removed = self.removed, []
        if not batch.seqs and not batch.removed:
            return None
        self.num_steps += 1
        return batch

    def _put(self, batch: Batch, seq: Sequence, n: int) -> None:
        seq.num_computed += n
        sample = seq.num_computed == seq.num_tokens
        if sample:
            seq.num_inflight += 1
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        batch.samples.append(sample)
        batch.epochs.append(seq.epoch)

    def preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks and queues it first in line; it is recomputed from its known tokens."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_inflight = 0
        seq.epoch += 1
        self._drop_from_worker(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def reset(self) -> list[Sequence]:
        """The workers lost every sequence and their KV cache (a rank failed): each running sequence
        goes back to the front of the waiting queue, in order, to be recomputed from its known tokens,
        and every block is free with no prefix cached. Returns the sequences sent back."""
        resumed, self.running = self.running, []
        for seq in resumed:
            seq.status = SeqStatus.WAITING
            seq.num_computed = 0
            seq.num_inflight = 0  # never sampled, never streamed: recomputed
            seq.epoch += 1
            seq.on_worker = False
            seq.block_table = []
            seq.num_committed_blocks = 0
        self.waiting.extendleft(reversed(resumed))
        self.removed = []
        self.blocks.reset()
        return resumed

    def postprocess(self, batch: Batch, sampled: dict[int, int]) -> list[Sequence]:
        """Appends the tokens a step sampled; returns the sequences that got one (stale ones skipped)."""
        updated = []
        for seq, sample, epoch in zip(batch.seqs, batch.samples, batch.epochs, strict=True):
            if not sample or seq.epoch != epoch or seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_inflight -= 1
            seq.token_ids.append(sampled[seq.seq_id])
            self.blocks.commit(seq)
            updated.append(seq)
            reason = seq.grammar.accept(seq.token_ids[-1]) if seq.grammar is not None else None
            reason = reason or self._check_stop(seq)
            if reason is not None:
                self.finish(seq, reason)
        for seq, sample in zip(batch.seqs, batch.samples, strict=True):
            if not sample and seq.status is SeqStatus.RUNNING:
                self.blocks.commit(seq)  # a prefill chunk: its full blocks become reusable
        return updated

    def _check_stop(self, seq: Sequence) -> FinishReason | None:
        token = seq.token_ids[-1]
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens and (
            token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        ):
            return FinishReason.STOP
        if len(seq.token_ids) >= seq.max_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends seq (stop, length or abort) and frees its blocks at once; idempotent."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.num_inflight = 0
        self._drop_from_worker(seq)

    def _drop_from_worker(self, seq: Sequence) -> None:
        if seq.on_worker:
            self.removed.append(seq.seq_id)
            seq.on_worker = False
