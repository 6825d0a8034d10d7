"""Prometheus metrics, scraped over HTTP as Prometheus does, move by exactly what the requests did."""

from __future__ import annotations

import logging
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import Client
from tests.service import Service

NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(
        tiny_model_dir, scheduler={"metrics_port": 0, "log_interval": 0.2}, num_kv_blocks=NUM_BLOCKS, block_size=16
    )
    yield svc
    svc.stop()


def scrape(svc: Service) -> dict[str, float]:
    """`name{label="value"}` -> value, for every sample."""
    url = f"http://127.0.0.1:{svc.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[name] - before.get(name, 0.0)


def test_requests_tokens_and_latency_histograms(service) -> None:
    prompts = [[5, 6, 7], list(range(10, 30)), list(range(40, 47))]
    before = scrape(service)
    with Client(service.addr) as c:
        for p in prompts:
            msgs = list(c.generate(p, max_tokens=5, temperature=0.0, ignore_eos=True))
            assert msgs[-1].usage.completion_tokens == 5
    after = scrape(service)
    assert moved(before, after, 'nanovllm_requests_total{finish_reason="length"}') == 3
    assert moved(before, after, 'nanovllm_requests_total{finish_reason="stop"}') == 0
    assert moved(before, after, "nanovllm_prompt_tokens_total") == sum(map(len, prompts))
    assert moved(before, after, "nanovllm_generation_tokens_total") == 15
    for hist in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert moved(before, after, f"nanovllm_{hist}_seconds_count") == 3
        assert moved(before, after, f"nanovllm_{hist}_seconds_sum") > 0
        assert after[f'nanovllm_{hist}_seconds_bucket{{le="+Inf"}}'] == after[f"nanovllm_{hist}_seconds_count"]
    # One prefill step and four decode steps per request at least (a finished sequence may ride one more).
    assert moved(before, after, "nanovllm_step_duration_seconds_count") >= 15
    assert after["nanovllm_kv_blocks_used"] == 0 and after["nanovllm_kv_blocks_free"] == NUM_BLOCKS
    assert after["nanovllm_num_requests_running"] == 0 and after["nanovllm_num_requests_waiting"] == 0


def test_prefix_cache_counts_and_hit_rate(service) -> None:
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 can be reused
    before = scrape(service)
    with Client(service.addr) as c:
        for _ in range(2):
            list(c.generate(prompt, max_tokens=2, temperature=0.0, ignore_eos=True))
    after = scrape(service)
    assert moved(before, after, "nanovllm_prefix_cache_queries_total") == 4
    assert moved(before, after, "nanovllm_prefix_cache_hits_total") == 2
    rate = after["nanovllm_prefix_cache_hits_total"] / after["nanovllm_prefix_cache_queries_total"]
    assert after["nanovllm_prefix_cache_hit_rate"] == pytest.approx(rate)


def test_gauges_while_running_and_abort_counted(service) -> None:
    before = scrape(service)
    with Client(service.addr) as c:
        call = c.generate(list(range(3, 40)), max_tokens=400, temperature=0.0, ignore_eos=True)
        next(call)
        during = scrape(service)
        call.cancel()
    assert during["nanovllm_num_requests_running"] == 1
    assert during["nanovllm_kv_blocks_used"] >= 3  # 37 prompt tokens and more in blocks of 16
    assert during["nanovllm_kv_blocks_used"] + during["nanovllm_kv_blocks_free"] == NUM_BLOCKS
    deadline = time.time() + 10
    while moved(before, scrape(service), 'nanovllm_requests_total{finish_reason="abort"}') != 1:
        assert time.time() < deadline, "the cancelled request was not counted as aborted"
        time.sleep(0.05)
    # The gauges are the core's report after its last step, or once it goes idle: soon after.
    while (after := scrape(service))["nanovllm_kv_blocks_used"] or after["nanovllm_num_requests_running"]:
        assert time.time() < deadline, f"the gauges still count the cancelled request: {after}"
        time.sleep(0.05)


def test_status_line_while_busy_and_silence_when_idle(service, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="scheduler_svc.status"):
        with Client(service.addr) as c:
            list(c.generate([5, 6, 7], max_tokens=100, temperature=0.0, ignore_eos=True))
        time.sleep(0.5)
        lines = [r.getMessage() for r in caplog.records if r.name == "scheduler_svc.status"]
        assert lines, "no status line while busy"
        assert "generation throughput" in lines[0] and "Running:" in lines[0] and "KV cache usage" in lines[0]
        time.sleep(0.6)
        assert len([r for r in caplog.records if r.name == "scheduler_svc.status"]) == len(lines)
