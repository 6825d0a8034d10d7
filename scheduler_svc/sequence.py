"""One request's sequence as the scheduler sees it: tokens, blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from scheduler_svc.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Grammar(Protocol):
    """A constrained sequence's grammar state (grammar.GrammarState), as the scheduler uses it."""

    def accept(self, token_id: int) -> FinishReason | None:
        """Advances past a sampled token; a reason when that ends the sequence."""
        ...


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + max_tokens, capped by the model's context length
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # Tokens whose K/V are computed or scheduled. With steps in flight this runs ahead of what
    # the worker has finished; that is fine because the worker runs steps in order.
    num_computed: int = 0
    # Decode tokens scheduled whose value has not come back yet: the worker knows them, we don't.
    num_inflight: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    # Chained hashes of the leading full blocks of token_ids (computed lazily, never stale: the
    # tokens of a full block never change).
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0  # leading blocks registered in the prefix cache
    # Bumped on preemption so results of steps scheduled before it are recognised as stale.
    epoch: int = 0
    # The worker holds state for this sequence (added and not yet removed).
    on_worker: bool = False
    finish_reason: FinishReason | None = None
    # Structured output: the matcher that follows its tokens (the worker masks with its own).
    grammar: Grammar | None = None
    # Another sample of the same prompt, added just before this one: this one waits for its
    # prompt blocks to be cached, so that the n samples of a request share them.
    leader: Sequence | None = None
    arrival: float = 0.0  # when the core got its Add (time.monotonic)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known to the scheduler plus those in flight."""
        return len(self.token_ids) + self.num_inflight

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def prompt_cached(self) -> bool:
        """Whether its prompt's full blocks are in the prefix cache (or never will be: it finished)."""
        return self.num_output_tokens > 0 or self.is_finished

    def can_grow(self) -> bool:
        """Whether another decode step may be scheduled without passing max_len."""
        return self.num_tokens < self.max_len
