"""What the worker keeps per sequence between steps, and what it reports back per sampled token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SamplingOptions:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # None: noise from the worker's seed (on the kernel path, with the seq id)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    min_tokens_banned_ids: list[int] = field(default_factory=list)  # masked until min_tokens are out
    logprobs: int = 0  # how many top logprobs to return; 0: none
    logit_bias_ids: list[int] = field(default_factory=list)
    logit_bias_values: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SeqState:
    seq_id: int
    token_ids: list[int]  # every known token: prompt, then generated
    num_prompt_tokens: int
    num_computed: int  # tokens whose K/V are in the cache
    block_table: list[int]
    sampling: SamplingOptions
    # Tokens sampled by launched steps whose values are still on the device. The next decode step
    # reads such a token there (by `slot`), so a step can launch before the last one's values land.
    num_pending: int = 0
    slot: int = -1  # this seq's row in the runner's on-device buffer of last sampled tokens
    held: int = -1  # index of the token whose value that row holds (-1: none of this seq's)
    synced_blocks: int = 0  # leading block_table entries already in row `slot` of the TableStore
    noise_base: int | None = None  # the sampler's per-seq key for its noise seeds, once computed
    matcher: Any = None  # structured output: its xgrammar GrammarMatcher (worker_svc/matchers.py)

    @property
    def num_tokens(self) -> int:
        """Tokens the seq has, including those whose values are not on the host yet."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


@dataclass(slots=True)
class Sampled:
    seq_id: int
    token_id: int
    logprob: float | None = None  # set when the seq asked for logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
