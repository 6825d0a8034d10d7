"""The standard throughput workload (Nano-vLLM's benchmark): 256 random prompts and lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TOKENS = 142_827
OUTPUT_TOKENS = 133_966


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    max_tokens: int


def standard(num_requests: int = 256, seed: int = 0) -> list[Job]:
    """random.seed(0); 256 prompts of randint(100, 1024) ids drawn with randint(0, 10000); then
    max_tokens = randint(100, 1024) per request (temperature 0.6, ignore_eos, set by the caller)."""
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_requests)]
    lengths = [random.randint(100, 1024) for _ in range(num_requests)]
    jobs = [Job(p, n) for p, n in zip(prompts, lengths, strict=True)]
    if num_requests == 256 and seed == 0:
        assert sum(len(j.prompt) for j in jobs) == PROMPT_TOKENS, "workload drifted from the reference"
        assert sum(j.max_tokens for j in jobs) == OUTPUT_TOKENS, "workload drifted from the reference"
    return jobs
