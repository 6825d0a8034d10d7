"""The standard workload with a share of its requests constrained by a JSON schema (issue 18).

    python -m bench.throughput --model bench/qwen3-0.6b --modes full,json [--json-share 0.1]

Every round(1 / share)-th request carries SCHEMA; all are sent at once, as in `full`, whose plain
run is the baseline. Reports the output tokens per second of the whole run and the median time per
output token of the constrained and of the plain requests, each from its first to its last token
as the client sees them. A constrained request ends when its JSON is complete, so its output is
shorter than its max_tokens; with random weights its strings are noise.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from tqdm import tqdm

from bench.throughput import client_kwargs, consume
from bench.workload import Job
from client import AsyncClient

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}


async def mixed(addr: str, jobs: list[Job], share: float) -> dict[str, float]:
    every = max(1, round(1 / share))
    schema = json.dumps(SCHEMA)
    bar = tqdm(total=len(jobs), desc="json share", unit="req", file=sys.stderr, mininterval=1.0)
    async with AsyncClient(addr) as c:
        # Warm-up, which also compiles the schema (cached from then on).
        await consume(c.generate(jobs[0].prompt[:16], max_tokens=8, ignore_eos=True, json_schema=schema))

        async def one(i: int, job: Job) -> tuple[int, bool, float | None]:
            constrained = i % every == 0
            kwargs = client_kwargs(job) | ({"json_schema": schema} if constrained else {})
            arrivals: list[float] = []
            n, first = await consume(c.generate(job.prompt, **kwargs), arrivals)
            bar.update(1)
            return n, constrained, (arrivals[-1] - first) / (n - 1) if first is not None and n > 1 else None

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        secs = time.perf_counter() - start
    bar.close()

    def tpot_ms(constrained: bool) -> float:
        return 1e3 * statistics.median(t for _, c, t in results if c is constrained and t is not None)

    outputs = [n for n, c, _ in results if c]
    return {
        "json_tok_s": sum(n for n, _, _ in results) / secs,
        "json_tpot_constrained_ms": tpot_ms(True),
        "json_tpot_plain_ms": tpot_ms(False),
        "json_constrained_requests": len(outputs),
        "json_constrained_mean_tokens": statistics.mean(outputs),
    }
