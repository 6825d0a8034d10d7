"""A one-line status every few seconds while the engine is busy, like vLLM's."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_svc.engine import Engine

log = logging.getLogger("scheduler_svc.status")


class StatusLog:
    def __init__(self, engine: Engine, interval: float) -> None:
        self.engine = engine
        self.interval = interval

    async def run(self) -> None:
        m = self.engine.metrics
        last, prompt, gen = time.monotonic(), m.prompt_tokens, m.generation_tokens
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            info, stats = self.engine.info, self.engine.stats
            moved = (m.prompt_tokens, m.generation_tokens) != (prompt, gen)
            # Silent when idle; the interval that saw the last tokens still gets its line.
            if info is not None and stats is not None and (stats.running or stats.waiting or moved):
                log.info(
                    "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    (m.prompt_tokens - prompt) / (now - last),
                    (m.generation_tokens - gen) / (now - last),
                    stats.running,
                    self.engine.num_waiting(),
                    100.0 * (info.num_blocks - stats.blocks_free) / info.num_blocks,
                    100.0 * stats.hit_rate,
                )
            last, prompt, gen = now, m.prompt_tokens, m.generation_tokens
