"""The standard workload with a share of its requests constrained by a JSON schema (issue 18).

    python -m bench.throughput --model bench/qwen3-0.6b --modes full,json [--json-share 0.1]

Every round(1 / share)-th request carries SCHEMA; all are sent at once, as in `full`, whose plain
run is the baseline. Reports the output tokens per second of the whole run and the median time per
output token of the constrained and of the plain requests, each from its first to its last token
as the client sees them. A constrained request ends when its JSON is complete (finish reason stop)
or at its max_tokens, whichever comes first (with random weights its strings are noise, and often
long); of those that completed, it counts the outputs that are JSON objects with the schema's
required keys and types (jsonschema itself is checked on the CPU, in tests/test_structured.py).
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


def valid(text: str) -> bool:
    """Whether text is SCHEMA's object as far as its required keys and their types go."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    types = {"name": str, "age": int, "role": str, "tags": list, "address": dict}
    return isinstance(obj, dict) and all(isinstance(obj.get(k), t) for k, t in types.items())


async def texts(stream, arrivals: list[float], parts: list[str]) -> tuple[int, float | None]:
    """consume(), keeping the streamed text; parts ends with the finish reason."""
    count, first = 0, None
    reason = None
    async for msg in stream:
        reason = msg.finish_reason or reason
        now = time.perf_counter()
        if msg.token_ids and first is None:
            first = now
        arrivals.append(now)
        parts.append(msg.text)
        count += len(msg.token_ids)
    parts.append(str(reason))
    return count, first


async def mixed(addr: str, jobs: list[Job], share: float) -> dict[str, float]:
    every = max(1, round(1 / share))
    schema = json.dumps(SCHEMA)
    bar = tqdm(total=len(jobs), desc="json share", unit="req", file=sys.stderr, mininterval=1.0)
    async with AsyncClient(addr) as c:
        # Warm-up, which also compiles the schema (cached from then on).
        await consume(c.generate(jobs[0].prompt[:16], max_tokens=8, ignore_eos=True, json_schema=schema))

        async def one(i: int, job: Job) -> tuple[int, bool, float | None, bool | None]:
            constrained = i % every == 0
            kwargs = client_kwargs(job) | ({"json_schema": schema} if constrained else {})
            arrivals: list[float] = []
            parts: list[str] = []
            n, first = await texts(c.generate(job.prompt, **kwargs), arrivals, parts)
            bar.update(1)
            tpot = (arrivals[-1] - first) / (n - 1) if first is not None and n > 1 else None
            complete = constrained and parts[-1] == "stop"
            return n, constrained, tpot, valid("".join(parts[:-1])) if complete else None

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        secs = time.perf_counter() - start
    bar.close()

    def tpot_ms(constrained: bool) -> float:
        return 1e3 * statistics.median(t for _, c, t, _ in results if c is constrained and t is not None)

    outputs = [n for n, c, _, _ in results if c]
    return {
        "json_tok_s": sum(n for n, _, _, _ in results) / secs,
        "json_tpot_constrained_ms": tpot_ms(True),
        "json_tpot_plain_ms": tpot_ms(False),
        "json_constrained_requests": len(outputs),
        "json_constrained_mean_tokens": statistics.mean(outputs),
        "json_constrained_complete": sum(ok is not None for _, _, _, ok in results),
        "json_constrained_valid": sum(ok is True for _, _, _, ok in results),
    }
