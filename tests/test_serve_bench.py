"""bench/serve.py: Poisson arrivals, and a small bounded run through a real `nanovllm serve` on the CPU."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench import serve
from bench.make_model import write as write_model
from bench.workload import Job

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 10240, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": True, "torch_dtype": "float32", "attention_bias": False,
}  # fmt: skip


def test_arrivals_are_poisson_at_the_rate() -> None:
    sent: list[float] = []

    async def stream(request: serve.Request) -> AsyncIterator[tuple[int, bool]]:
        sent.append(asyncio.get_running_loop().time())
        yield 1, True

    requests = [serve.Request([1], 1)] * 200
    traces, wall = asyncio.run(serve.at_rate(stream, requests, 400.0, seed=0))
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(traces) == 200 and all(t.tokens == 1 for t in traces)
    assert 0.7 / 400 < statistics.mean(gaps) < 1.4 / 400  # exponential gaps, mean 1 / rate
    assert statistics.stdev(gaps) > 0.5 * statistics.mean(gaps)  # not evenly spaced
    assert wall < 5


def test_salted_prompts_differ_only_in_the_first_token() -> None:
    job = Job([10000, 5, 6], 4)
    assert serve.salted(job, 2) == Job([1, 5, 6], 4)


def test_small_run_through_the_grpc_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    model = write_model(tmp_path / "config.json", tmp_path / "model")
    serve.main([
        "--model", str(model), "--device", "cpu", "--max-model-len", "512", "--num-requests", "6",
        "--max-prompt", "40", "--max-tokens", "6", "--idle", "1", "--rates", "20,inf",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"idle: TPOT [\d.]+ ms", out)
    # The rates asked for, then one at 80% of the saturated rate (inf's throughput / 6 tokens a request).
    line = r"rate ([\d.e+]+|inf) req/s: 6 requests in [\d.]+ s, ([\d,]+) output tok/s, a step in flight"
    rates = re.findall(line, out)
    assert [r for r, _ in rates][:2] == ["20", "inf"] and len(rates) == 3
    saturated = float(rates[1][1].replace(",", "")) / 6  # requests a second
    assert float(rates[2][0]) == pytest.approx(0.8 * saturated, rel=0.01, abs=0.01)
    assert len(re.findall(r"TTFT \(ms\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", out)) == 3
    assert len(re.findall(r"ITL \(ms\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+worst gap [\d.]+ ms", out)) == 3
    assert re.search(r"highest rate with p99 TTFT < 1 s: ([\d.e+]+|inf) req/s", out)
    assert re.search(r"offered load: 20 req/s \d+%, [\d.e+]+ req/s 80%", out)
    verdict = r"at 80% load \([\d.e+]+ req/s; saturated [\d.e+]+ req/s of 6 output tokens\): p99 ITL [\d.]+ ms"
    assert re.search(verdict + r" is (under|over) 3x idle TPOT", out)
