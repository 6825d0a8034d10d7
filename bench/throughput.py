"""Throughput and latency of the standard workload, through the full gRPC stack and in-process.

    python -m bench.throughput --model DIR --load-format dummy [--modes full,inproc,latency]

full:    `nanovllm serve` (scheduler + worker processes) and an asyncio gRPC client sending all
         requests at once; output tokens / wall seconds from the first request sent to the last
         token received, after one warm-up request.
inproc:  the same engine, scheduler and model runner in this process, no gRPC (bench/local_worker.py).
latency: one request at a time (256 prompt + 512 output tokens, greedy) through gRPC: time to first
         token, time per output token, and ms per output token including prefill.
json:    as full, with --json-share of the requests constrained by a JSON schema (bench/structured.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from bench.make_model import write as write_model
from bench.timing import cpu_seconds, median, print_results
from bench.workload import Job, standard
from client import AsyncClient
from worker_svc.config import KV_CACHE_DTYPES

TEMPERATURE = 0.6


def model_dir(args: argparse.Namespace) -> str:
    path = Path(args.model)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return str(path)
    out = Path("/tmp") / f"{path.name}-bench"
    if not (out / "tokenizer.json").exists():
        write_model(path / "config.json", out)  # a config alone: add a synthetic full-size tokenizer
    return str(out)


def serve_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--load-format", args.load_format, "--device", args.device, "--dtype", args.dtype]
    flags += ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    flags += ["--attention-backend", args.attention_backend]
    flags += ["--tensor-parallel-size", str(args.tp), "--max-inflight-steps", str(args.max_inflight_steps)]
    flags += ["--stream-interval", str(args.stream_interval), "--kv-cache-dtype", args.kv_cache_dtype]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    if args.num_kvcache_blocks:
        flags += ["--num-kvcache-blocks", str(args.num_kvcache_blocks)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    if args.prefill_graph_tokens is not None:
        flags += ["--prefill-graph-tokens", str(args.prefill_graph_tokens)]
    if args.compile:
        flags.append("--compile")
    if args.no_core_process:
        flags.append("--no-core-process")
    return flags


async def consume(stream, arrivals: list[float] | None = None) -> tuple[int, float | None]:
    """(output tokens received, arrival time of the first one); `arrivals` collects every message's."""
    count, first = 0, None
    async for msg in stream:
        now = time.perf_counter()
        if msg.token_ids and first is None:
            first = now
        if arrivals is not None:
            arrivals.append(now)
        count += len(msg.token_ids)
    return count, first


async def run_jobs(generate, jobs: list[Job], label: str) -> tuple[int, float]:
    """Sends every job at once; returns (output tokens, wall seconds)."""
    bar = tqdm(total=len(jobs), desc=label, unit="req", file=sys.stderr, mininterval=1.0)

    async def one(job: Job) -> int:
        n, _ = await consume(generate(job))
        bar.update(1)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(j) for j in jobs))
    elapsed = time.perf_counter() - start
    bar.close()
    return sum(counts), elapsed


def client_kwargs(job: Job, temperature: float = TEMPERATURE) -> dict:
    return {"max_tokens": job.max_tokens, "temperature": temperature, "ignore_eos": True}


async def full_stack(addr: str, jobs: list[Job]) -> tuple[int, float]:
    async with AsyncClient(addr) as c:
        await consume(c.generate(jobs[0].prompt[:16], max_tokens=8, ignore_eos=True))  # warm-up
        return await run_jobs(lambda j: c.generate(j.prompt, **client_kwargs(j)), jobs, "full stack")


LATENCY_TOKENS = 8 + 3 * 512  # `latency`'s warm-up and its three requests


async def latency(addr: str, repeats: int = 3) -> dict[str, float]:
    ttft, tpot, per_token = [], [], []
    async with AsyncClient(addr) as c:
        await consume(c.generate(list(range(16)), max_tokens=8, ignore_eos=True))
        for r in range(repeats):
            job = Job(list(range(1000 + 300 * r, 1256 + 300 * r)), 512)  # a new prompt: no prefix-cache hit
            start, arrivals = time.perf_counter(), []
            n, first = await consume(c.generate(job.prompt, **client_kwargs(job, temperature=0.0)), arrivals)
            gaps = [f"{1e3 * (b - a):.2f}" for a, b in zip([start, *arrivals[:5]], arrivals[:6], strict=True)]
            print(f"latency: first message gaps (ms): {', '.join(gaps)}", file=sys.stderr)
            end = time.perf_counter()
            assert n == job.max_tokens and first is not None
            ttft.append(first - start)
            tpot.append((end - first) / (n - 1))
            per_token.append((end - start) / n)
    return {
        "ttft_ms": 1e3 * median(ttft),
        "tpot_ms": 1e3 * median(tpot),
        "ms_per_token_incl_prefill": 1e3 * median(per_token),
    }


def process_tree(pid: int) -> dict[str, int]:
    """The scheduler (`nanovllm serve` itself), its engine core process and its workers, by role."""
    children = [
        int(d.name) for d in Path("/proc").iterdir()
        if d.name.isdigit() and (d / "stat").exists()
        and (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid)
    ]  # fmt: skip
    roles = {"scheduler": pid}
    workers = 0
    for child in sorted(children):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"resource_tracker" in cmdline:
            continue  # multiprocessing's helper, idle
        if b"multiprocessing" in cmdline:
            roles["core"] = child  # the engine core, started with multiprocessing's spawn
        else:
            roles[f"worker {workers}"] = child
            workers += 1
    return roles


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process by role (as process_tree names them), and of this client."""
    return {role: cpu_seconds(pid) for role, pid in pids.items()} | {"client": time.process_time()}


def start(cmd: list[str], ready: str) -> subprocess.Popen:
    """Runs cmd, its output passed on to stderr; returns once it prints a line containing `ready`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        if ready in line:
            break
    else:
        raise SystemExit(f"{' '.join(cmd[:4])} exited with {proc.wait()}")
    # Keep draining its output so it never blocks on a full pipe.
    threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stdout], daemon=True).start()
    return proc


def start_server(model: str, port: int, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """Runs `nanovllm serve` on this port; returns once it serves (its output goes to stderr)."""
    cmd = [sys.executable, "-m", "nanovllm_grpc", "serve", "--model", model, "--port", str(port), *flags]
    return start(cmd, "scheduler ready"), f"127.0.0.1:{port}"


@contextlib.contextmanager
def worker_and_scheduler(
    worker_cmd: list[str], scheduler_cmd: list[str]
) -> Iterator[tuple[subprocess.Popen, subprocess.Popen]]:
    """A worker process and a scheduler process started apart (the benchmark wraps the worker), each
    once it is ready; yields both. On the way out the scheduler stops first (SIGINT, ending
    its step stream), then the worker (SIGTERM, as `nanovllm serve` stops it)."""
    worker = start(worker_cmd, "ready on")
    try:
        sched = start(scheduler_cmd, "scheduler ready")
        try:
            yield worker, sched
        finally:
            sched.send_signal(signal.SIGINT)
            sched.wait(timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


async def in_process(args: argparse.Namespace, model: str, jobs: list[Job]) -> tuple[int, float]:
    from bench.local_worker import LocalWorker
    from nanovllm_grpc.process import settle_heap
    from scheduler_svc.config import CoreConfig, SchedulerConfig
    from scheduler_svc.engine import Engine
    from scheduler_svc.sampling_params import SamplingParams
    from worker_svc.config import WorkerConfig

    worker = LocalWorker(
        WorkerConfig(
            model=model,
            load_format=args.load_format,
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            num_kv_blocks=args.num_kvcache_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            **({} if args.prefill_graph_tokens is None else {"prefill_graph_tokens": args.prefill_graph_tokens}),
            compile=args.compile,
            attention_backend=args.attention_backend,
            kv_cache_dtype=args.kv_cache_dtype,
        )
    )
    engine = Engine(
        SchedulerConfig(
            model=model,
            workers=("in-process",),
            stream_interval=args.stream_interval,
            core_process=False,  # the in-process worker is an object of this process
            core=CoreConfig(max_inflight_steps=args.max_inflight_steps),  # batch limits: the worker's
        ),
        workers=worker,  # type: ignore[arg-type]
    )
    await engine.start()
    settle_heap()  # as the frontend, the core and the worker each do after start-up
    ids = iter(range(10**9))

    def generate(job: Job):
        params = SamplingParams(**client_kwargs(job))
        return engine.generate(f"r{next(ids)}", job.prompt, params)

    try:
        await consume(engine.generate("warm-up", jobs[0].prompt[:16], SamplingParams(max_tokens=8, ignore_eos=True)))
        return await run_jobs(generate, jobs, "in-process")
    finally:
        await engine.stop()


def add_server_args(p: argparse.ArgumentParser, max_num_batched_tokens: int, model_required: bool = True) -> None:
    """The model and the settings of the server this benchmark starts (serve_flags passes them on)."""
    p.add_argument(
        "--model", required=model_required, help="model dir; a dir with only config.json gets a synthetic tokenizer"
    )
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-kvcache-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--max-inflight-steps", type=int, default=3)
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed message")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--prefill-graph-tokens", type=int, default=None, help="the worker's (default: its default)")
    p.add_argument("--compile", action="store_true", help="the worker's --compile")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-core-process", action="store_true", help="full stack: the engine core in the scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # vLLM's default for offline runs (its LLM class) on an H100, the peer's setting on this workload;
    # its API server and `nanovllm serve` default to 8192, for shorter steps while prompts arrive.
    add_server_args(p, max_num_batched_tokens=16384)
    p.add_argument("--modes", default="full,inproc,latency")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--json-share", type=float, default=0.1, help="json mode: share of requests with a JSON schema")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    modes = args.modes.split(",")
    model = model_dir(args)
    jobs = standard(args.num_requests)
    total_prompt = sum(len(j.prompt) for j in jobs)
    results: dict[str, float] = {}
    if "full" in modes or "latency" in modes or "json" in modes:
        proc, addr = start_server(model, 50151, serve_flags(args))
        try:
            if "full" in modes:
                # CPU time per process over the run: a process near 1 CPU-second per second is the bottleneck.
                procs = process_tree(proc.pid)
                before = cpu_times(procs)
                n, secs = asyncio.run(full_stack(addr, jobs))
                after = cpu_times(procs)
                results["full_tok_s"] = n / secs
                print(f"full stack: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)
                busy = ", ".join(f"{k} {(after[k] - before[k]) / secs:.0%}" for k in before)
                print(f"full stack: CPU busy (of one core) {busy}", flush=True)
            if "json" in modes:
                from bench.structured import mixed

                for k, v in asyncio.run(mixed(addr, jobs, args.json_share)).items():
                    results[k] = v
                    print(f"json share {k}: {v:,.3f}", flush=True)
            if "latency" in modes:
                # CPU time per process per token: where a host-bound stream spends its time.
                procs = process_tree(proc.pid)
                before = cpu_times(procs)
                for k, v in asyncio.run(latency(addr)).items():
                    results[k] = v
                    print(f"latency {k}: {v:.3f}", flush=True)
                after = cpu_times(procs)
                busy = ", ".join(f"{k} {1e3 * (after[k] - before[k]) / LATENCY_TOKENS:.3f}" for k in before)
                print(f"latency: CPU ms per token {busy}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if "inproc" in modes:
        n, secs = asyncio.run(in_process(args, model, jobs))
        results["inproc_tok_s"] = n / secs
        print(f"in-process: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)
    print(f"\nworkload: {len(jobs)} requests, {total_prompt} prompt tokens, {sum(j.max_tokens for j in jobs)} output")
    if "full_tok_s" in results and "json_tok_s" in results:
        results["json share / plain"] = results["json_tok_s"] / results["full_tok_s"]
    if "full_tok_s" in results and "inproc_tok_s" in results:
        results["full / in-process"] = results["full_tok_s"] / results["inproc_tok_s"]
    print_results(results)


if __name__ == "__main__":
    main()
