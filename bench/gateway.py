"""The standard workload through the SMG gateway's OpenAI API against our own gRPC API, same server.

    python -m bench.gateway --model bench/qwen3-0.6b [any bench.throughput serving flag]

Starts `nanovllm serve` and `smg launch` in front of it, then, after a warm-up and with the prefix
cache flushed before each run: all requests at once over our gRPC API (bench.throughput's client),
the same requests at once as streaming /v1/completions through the gateway, and one request at a
time through each for latency. The gateway's OpenAI API takes text prompts only, so both paths get
each standard prompt's ids decoded to text (our server tokenizes it; the gateway tokenizes it and
sends ids); the output lengths are the standard ones. The HTTP client is a small stdlib one, so
that the client's own cost stays close to the gRPC client's. `--num-requests`, `--max-tokens` and
`--prompt-tokens` shrink the workload for a check on a CPU with a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpbg
from transformers import AutoTokenizer

from bench import throughput as tp
from bench.workload import standard
from client import AsyncClient

MODEL = "model"  # served name, so the OpenAI requests need not know the directory


async def post_sse(port: int, body: dict) -> AsyncIterator[dict]:
    """POSTs to the gateway on 127.0.0.1 and yields each server-sent event's JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    status = await reader.readline()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    if b" 200 " not in status:
        raise RuntimeError(f"{status.decode().strip()}: {(await reader.read()).decode()[:500]}")
    assert headers.get("transfer-encoding") == "chunked", headers
    buf = b""
    try:
        while size := int((await reader.readline()).split(b";")[0], 16):
            buf += await reader.readexactly(size)
            await reader.readexactly(2)
            *events, buf = buf.split(b"\n\n")
            for e in events:
                if e.startswith(b"data: ") and e != b"data: [DONE]":
                    yield json.loads(e[6:])
    finally:
        writer.close()


@dataclass(frozen=True)
class TextJob:
    prompt: str
    max_tokens: int


async def consume_http(port: int, job: TextJob, temperature: float) -> tuple[int, float | None]:
    """(completion tokens, arrival of the first text), as bench.throughput.consume for gRPC."""
    body = {
        "model": MODEL,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    count, first = 0, None
    async for event in post_sse(port, body):
        if first is None and event.get("choices"):
            first = time.perf_counter()
        if event.get("usage"):
            count = event["usage"]["completion_tokens"]
    return count, first


Consume = Callable[[TextJob, float], Awaitable[tuple[int, float | None]]]


def consume_grpc(client: AsyncClient, job: TextJob, temperature: float) -> Awaitable[tuple[int, float | None]]:
    return tp.consume(client.generate(job.prompt, max_tokens=job.max_tokens, temperature=temperature, ignore_eos=True))


def flush(addr: str) -> None:
    """Empties the server's prefix cache, so that no run reuses the prompts of the run before."""
    with grpc.insecure_channel(addr) as ch:
        res = vpbg.VllmEngineStub(ch).FlushCache(cpb.FlushCacheRequest(timeout_s=60))
    assert res.success, res.message


async def throughput(consume: Consume, jobs: list[TextJob]) -> tuple[int, float]:
    """Sends every job at once, after a warm-up request; returns (output tokens, wall seconds)."""
    await consume(TextJob(jobs[0].prompt[:40], 8), tp.TEMPERATURE)
    start = time.perf_counter()
    counts = await asyncio.gather(*(consume(j, tp.TEMPERATURE) for j in jobs))
    return sum(n for n, _ in counts), time.perf_counter() - start


async def latency(consume: Consume, jobs: list[TextJob]) -> dict[str, float]:
    """Greedy, one request at a time: time to first token and per output token after it."""
    ttft, tpot = [], []
    for job in jobs:
        start = time.perf_counter()
        n, first = await consume(job, 0.0)
        end = time.perf_counter()
        assert n == job.max_tokens and first is not None
        ttft.append(first - start)
        tpot.append((end - first) / (n - 1))
    return {"ttft_ms": 1e3 * statistics.median(ttft), "tpot_ms": 1e3 * statistics.median(tpot)}


async def grpc_throughput(addr: str, jobs: list[TextJob]) -> tuple[int, float]:
    async with AsyncClient(addr) as c:
        return await throughput(lambda j, t: consume_grpc(c, j, t), jobs)


async def grpc_latency(addr: str, jobs: list[TextJob]) -> dict[str, float]:
    async with AsyncClient(addr) as c:
        return await latency(lambda j, t: consume_grpc(c, j, t), jobs)


def start_gateway(addr: str, model: str, port: int) -> subprocess.Popen:
    cmd = ["smg", "launch", "--worker-urls", f"grpc://{addr}", "--model-path", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warn"]  # its default policy: cache_aware
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until it has registered the worker
        assert proc.poll() is None, f"smg exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                registered = json.loads(r.read())["data"]
            if registered:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("smg did not register the server in 120 s")


def as_text(tok: Any, ids: list[int], n: int) -> str:
    """Text that the model's tokenizer encodes to about `n` tokens, decoded from a prefix of `ids`.
    The decoded ids do not re-encode to themselves (a byte-level BPE splits the text at spaces and
    merges in its own order), so the prefix is found by bisection on the encoded length."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.encode(tok.decode(ids[:mid]), add_special_tokens=False)) <= n:
            lo = mid
        else:
            hi = mid - 1
    return tok.decode(ids[:lo])


def text_jobs(args: argparse.Namespace, model: str) -> list[TextJob]:
    """The standard jobs as text of about their prompt's length in tokens, cut down by the smoke-test
    flags (ids folded into the vocabulary)."""
    tok = AutoTokenizer.from_pretrained(model)
    vocab = len(tok)
    jobs = []
    for j in standard()[: args.num_requests]:
        ids = [t % vocab for t in j.prompt[: args.prompt_tokens]]
        jobs.append(TextJob(as_text(tok, ids, len(ids)), min(j.max_tokens, args.max_tokens or j.max_tokens)))
    return jobs


def latency_jobs(args: argparse.Namespace, model: str) -> list[TextJob]:
    """bench.throughput.latency's requests: three new 256-token prompts, 512 output tokens each."""
    tok = AutoTokenizer.from_pretrained(model)
    n = min(256, args.prompt_tokens or 256)
    prompts = [as_text(tok, [(1000 + 300 * r + i) % len(tok) for i in range(n)], n) for r in range(3)]
    return [TextJob(p, min(512, args.max_tokens or 512)) for p in prompts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="cap each request's output (a CPU check)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="cap each prompt (a CPU check)")
    p.add_argument("--gateway-port", type=int, default=30151)
    p.add_argument("--skip-latency", action="store_true")
    args, rest = p.parse_known_args()
    serve = tp.parse_args(rest)  # the serving flags, as bench.throughput takes them
    model = tp.model_dir(serve)
    jobs = text_jobs(args, model)
    flags = [*tp.serve_flags(serve), "--served-model-name", MODEL]
    server, addr = tp.start_server(model, 50151, flags)
    gateway = start_gateway(addr, model, args.gateway_port)
    port = args.gateway_port
    results: dict[str, float] = {}
    try:
        flush(addr)
        n, secs = asyncio.run(grpc_throughput(addr, jobs))
        results["grpc_tok_s"] = n / secs
        flush(addr)
        cpu = tp.cpu_seconds(gateway.pid)
        m, secs = asyncio.run(throughput(lambda j, t: consume_http(port, j, t), jobs))
        results["gateway_tok_s"] = m / secs
        results["gateway_cpu_busy"] = (tp.cpu_seconds(gateway.pid) - cpu) / secs
        assert m == n == sum(j.max_tokens for j in jobs), (m, n)
        if not args.skip_latency:
            single = latency_jobs(args, model)
            flush(addr)
            results |= {f"grpc_{k}": v for k, v in asyncio.run(grpc_latency(addr, single)).items()}
            flush(addr)
            lat = asyncio.run(latency(lambda j, t: consume_http(port, j, t), single))
            results |= {f"gateway_{k}": v for k, v in lat.items()}
    finally:
        gateway.kill()
        server.terminate()
        server.wait(timeout=60)
    print(f"\nworkload: {len(jobs)} requests, {n} output tokens")
    for k, v in results.items():
        print(f"{k:>36}: {v:,.3f}")
    print(f"{'gateway / grpc throughput':>36}: {results['gateway_tok_s'] / results['grpc_tok_s']:.3f}")


if __name__ == "__main__":
    main()
