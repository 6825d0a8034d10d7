"""Online serving: the standard prompts arriving as a Poisson process, each request streamed.

    python3 -m bench.serve --model bench/qwen3-0.6b [--rates 8,16,32,64,inf]   (starts `nanovllm serve`)
    python3 -m bench.serve --addr HOST:PORT [--metrics URL]                     (a running nanovllm)
    python3 -m bench.serve --openai http://HOST:PORT/v1 [--served-model NAME]   (any OpenAI-compatible server)

At each rate the standard workload's requests (bench/workload.py: token-id prompts, temperature
0.6, ignore_eos) are sent at Poisson arrival times (seed 0), all streamed: through the gRPC API, or
as streamed /v1/completions with the openai package; `--text-with DIR` sends the prompts as text
decoded with that tokenizer, for servers that take no token ids (the smg gateway). Each rate's
prompts start with their own first token, so no rate finds another's prompts in the prefix cache.
First, a few requests one at a time (at most 256 output tokens each) give the idle time per output
token (TPOT); --max-prompt and --max-tokens shrink the workload for a quick run.

Per rate it prints the time to first token (TTFT), the inter-token latency (ITL: the gaps between a
request's streamed messages, one token each unless the server merges them), TPOT and end-to-end
latency (p50, p90, p99), the worst gap, and the share of the wall time the worker had a step in
flight (from the server's Prometheus metrics, when known); then the highest rate whose p99 TTFT
stays under 1 s.

The load. The rate `inf` sends every request at once: its throughput is the server's saturated
one, and that over the output tokens a request gets is the highest rate it can keep up with. A
rate's offered load is its share of that rate; past 100% the server falls behind and queues grow
for as long as requests keep coming. After the rates, one more runs at --load (80%) of the
saturated rate, where the GPU is that busy, and the verdict compares its p99 ITL with 3x the idle
TPOT. Each rate's offered load is printed at the end. (The share of time a step is in flight says
little here: a step is nearly always in flight once requests run, however little the GPU does.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from bench.throughput import TEMPERATURE, add_server_args, model_dir, serve_flags, start_server
from bench.workload import Job, standard
from client import AsyncClient
from nanovllm_grpc.launch import free_port


@dataclass(frozen=True)
class Request:
    """A job as sent: its token ids, or their text for servers that take no token-id prompts."""

    prompt: list[int] | str
    max_tokens: int


# A request's stream: (tokens, whether they came as a message of their own) for each message; a
# server that tells its token count only at the end (OpenAI's usage) adds the rest as no message.
Stream = Callable[[Request], AsyncIterator[tuple[int, bool]]]


@dataclass
class Trace:
    """One request as the client saw it: when it was sent, and when each message with tokens came."""

    sent: float
    arrivals: list[float]
    tokens: int

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]

    @property
    def tpot(self) -> float:
        return (self.arrivals[-1] - self.arrivals[0]) / max(self.tokens - 1, 1)


def salted(job: Job, salt: int) -> Job:
    """The job with its first token moved by `salt` (ids stay in the workload's 0..10000)."""
    return Job([(job.prompt[0] + salt) % 10001, *job.prompt[1:]], job.max_tokens)


async def trace(stream: Stream, request: Request) -> Trace:
    t = Trace(time.perf_counter(), [], 0)
    async for n, message in stream(request):
        if n and message:
            t.arrivals.append(time.perf_counter())
        t.tokens += n
    if not t.arrivals:
        raise RuntimeError("a request streamed no tokens")
    return t


async def at_rate(stream: Stream, requests: list[Request], rate: float, seed: int) -> tuple[list[Trace], float]:
    """Sends the requests at Poisson arrival times of `rate` a second; (traces, wall seconds)."""
    rng = random.Random(seed)
    start, due, tasks = time.perf_counter(), 0.0, []
    for request in requests:
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
        tasks.append(asyncio.create_task(trace(stream, request)))
    traces = await asyncio.gather(*tasks)
    return traces, time.perf_counter() - start


def pcts(values: list[float], scale: float, digits: int = 1) -> str:
    return " ".join(f"{v:9.{digits}f}" for v in np.percentile(values, [50, 90, 99]) * scale)


def step_seconds(url: str | None) -> float | None:
    """The worker's total step time so far, from the scheduler's Prometheus metrics at `url`."""
    if url is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nanovllm_step_duration_seconds_sum":
                return sample.value
    return None


def grpc_stream(client: AsyncClient) -> Stream:
    async def stream(request: Request) -> AsyncIterator[tuple[int, bool]]:
        async for msg in client.generate(
            request.prompt, max_tokens=request.max_tokens, temperature=TEMPERATURE, ignore_eos=True
        ):
            yield len(msg.token_ids), True

    return stream


async def openai_stream(url: str, model: str | None) -> Stream:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", timeout=600)
    name = model or (await client.models.list()).data[0].id

    async def stream(request: Request) -> AsyncIterator[tuple[int, bool]]:
        chunks = await client.completions.create(
            model=name, prompt=request.prompt, max_tokens=request.max_tokens, temperature=TEMPERATURE, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        seen = 0
        async for chunk in chunks:
            if chunk.choices:  # a token each, as far as the client can tell
                seen += 1
                yield 1, True
            elif chunk.usage is not None:  # the last chunk: the true count
                yield chunk.usage.completion_tokens - seen, False

    return stream


def as_sent(tokenizer: str | None) -> Callable[[Job], Request]:
    """Jobs as token ids, or as text decoded with the tokenizer in that directory (the server
    tokenizes it again, which may not give back the same count)."""
    if tokenizer is None:
        return lambda job: Request(job.prompt, job.max_tokens)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return lambda job: Request(tok.decode(job.prompt), job.max_tokens)


async def bench(stream: Stream, args: argparse.Namespace, metrics: str | None) -> None:
    jobs = [Job(j.prompt[: args.max_prompt], min(j.max_tokens, args.max_tokens)) for j in standard(args.num_requests)]
    send = as_sent(args.text_with)
    await trace(stream, send(Job(jobs[0].prompt[:16], 8)))  # warm-up
    idle = [await trace(stream, send(salted(Job(j.prompt, min(j.max_tokens, 256)), 1))) for j in jobs[: args.idle]]
    idle_tpot = statistics.median(t.tpot for t in idle)
    print(f"idle: TPOT {1e3 * idle_tpot:.2f} ms, TTFT {1e3 * statistics.median(t.ttft for t in idle):.1f} ms")
    # Requests a second the server keeps up with, and the output tokens a request got, once `inf` has run.
    saturated: float | None = None
    tokens_per_request = 0.0
    rows = []
    for k, rate in enumerate([*args.rates, None]):
        if rate is None:  # the load run, last
            if saturated is None or not args.load:
                break
            rate = args.load * saturated
        before = step_seconds(metrics)
        traces, wall = await at_rate(stream, [send(salted(j, 2 + k)) for j in jobs], rate, args.seed)
        after = step_seconds(metrics)
        busy = (after - before) / wall if before is not None and after is not None else None
        gaps = [g for t in traces for g in t.gaps]
        ttft, worst = [t.ttft for t in traces], max(gaps, default=0.0)
        tokens = sum(t.tokens for t in traces)
        if rate == float("inf"):
            tokens_per_request = tokens / len(traces)
            saturated = tokens / wall / tokens_per_request
        print(
            f"rate {rate:.4g} req/s: {len(traces)} requests in {wall:.1f} s, {tokens / wall:,.0f} output tok/s"
            + (f", a step in flight {busy:.0%} of the time" if busy is not None else "")
        )
        print(f"{'':>4}{'p50':>24} {'p90':>9} {'p99':>9}")
        print(f"    TTFT (ms)        {pcts(ttft, 1e3)}")
        print(f"    ITL (ms)         {pcts(gaps, 1e3)}   worst gap {1e3 * worst:.1f} ms")
        print(f"    TPOT (ms)        {pcts([t.tpot for t in traces], 1e3)}")
        print(f"    end-to-end (s)   {pcts([t.arrivals[-1] - t.sent for t in traces], 1.0, 2)}")
        rows.append((rate, float(np.percentile(ttft, 99)), float(np.percentile(gaps, 99))))
    under = [r for r, p99_ttft, _ in rows if p99_ttft < 1.0]
    print(f"highest rate with p99 TTFT < 1 s: {f'{max(under):.4g} req/s' if under else 'none of those run'}")
    if saturated is None:
        print("no offered loads: they need the rate inf (the saturated throughput)")
        return
    finite = [r for r, *_ in rows if r != float("inf")]
    print("offered load: " + ", ".join(f"{r:.4g} req/s {r / saturated:.0%}" for r in finite))
    if not args.load:
        return
    rate, _, p99_itl = rows[-1]
    verdict = "under" if p99_itl < 3 * idle_tpot else "over"
    print(
        f"at {args.load:.0%} load ({rate:.4g} req/s; saturated {saturated:.4g} req/s of {tokens_per_request:.0f} "
        f"output tokens): p99 ITL {1e3 * p99_itl:.2f} ms is {verdict} 3x idle TPOT ({3e3 * idle_tpot:.2f} ms)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The server's own default for online serving: shorter steps while prompts arrive.
    add_server_args(p, max_num_batched_tokens=8192, model_required=False)
    p.add_argument("--rates", default="8,16,32,64,inf", help="requests a second, comma-separated (inf: all at once)")
    p.add_argument("--num-requests", type=int, default=256, help="requests at each rate")
    p.add_argument("--idle", type=int, default=3, help="requests sent one at a time first, for the idle TPOT")
    p.add_argument("--seed", type=int, default=0, help="of the arrival times")
    p.add_argument(
        "--load", type=float, default=0.8, help="after the rates, one at this share of inf's saturated rate (0: none)"
    )
    p.add_argument("--max-prompt", type=int, default=None, help="cut prompts to this many tokens (a quick run)")
    p.add_argument("--max-tokens", type=int, default=10**9, help="cap each request's output (a quick run)")
    p.add_argument("--addr", help="a running nanovllm scheduler, HOST:PORT")
    p.add_argument("--metrics", help="its Prometheus URL, for the share of time a step was in flight")
    p.add_argument("--openai", help="an OpenAI-compatible server's base URL (http://HOST:PORT/v1)")
    p.add_argument("--served-model", help="model name for --openai (default: its first model)")
    p.add_argument(
        "--text-with", metavar="TOKENIZER_DIR", help="send text prompts decoded with this tokenizer (smg takes no ids)"
    )
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    if not (args.model or args.addr or args.openai):
        p.error("give --model (to start a server), --addr or --openai")
    return args


async def run(args: argparse.Namespace, addr: str | None, metrics: str | None) -> None:
    if args.openai:
        await bench(await openai_stream(args.openai, args.served_model), args, metrics)
        return
    assert addr is not None
    async with AsyncClient(addr) as client:
        await bench(grpc_stream(client), args, metrics)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.openai or args.addr:
        asyncio.run(run(args, args.addr, args.metrics))
        return
    port = free_port()
    proc, addr = start_server(model_dir(args), free_port(), [*serve_flags(args), "--metrics-port", str(port)])
    try:
        asyncio.run(run(args, addr, f"http://127.0.0.1:{port}/metrics"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
