"""A one-line status every few seconds while the engine is busy, like vLLM's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from scheduler_svc.metrics import Load, Metrics

log = logging.getLogger("scheduler_svc.status")


class StatusLog:
    def __init__(self, metrics: Metrics, load: Callable[[], Load | None], interval: float) -> None:
        self.metrics = metrics
        self.load = load
        self.interval = interval

    async def run(self) -> None:
        m = self.metrics
        last, prompt, gen = time.monotonic(), m.prompt_tokens, m.generation_tokens
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            load = self.load()
            moved = (m.prompt_tokens, m.generation_tokens) != (prompt, gen)
            # Silent when idle; the interval that saw the last tokens still gets its line.
            if load is not None and (load.stats.running or load.waiting or moved):
                info, stats = load.info, load.stats
                log.info(
                    "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    (m.prompt_tokens - prompt) / (now - last),
                    (m.generation_tokens - gen) / (now - last),
                    stats.running,
                    load.waiting,
                    100.0 * (info.num_blocks - stats.blocks_free) / info.num_blocks,
                    100.0 * stats.hit_rate,
                )
            last, prompt, gen = now, m.prompt_tokens, m.generation_tokens
