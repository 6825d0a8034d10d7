"""Two replicas of our service behind the real SMG gateway, driven by the official `openai` client.

The replicas run in this process (tests/service.py: real gRPC on loopback); the gateway is the
`smg` binary, which tokenizes, renders the chat template and detokenizes itself and talks to each
replica's vllm.grpc.engine.VllmEngine service. A replica is "killed" by stopping its servers.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from client import Client
from tests.gateway import Gateway, get_json
from tests.kv_subscriber import KvSubscriber
from tests.service import Service

MODEL = "tiny"  # the model directory's name, which our replicas report as served_model_name
VLLM_NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
    "vllm:cache_config_info",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("gw") / MODEL  # served under its directory's name
    d.symlink_to(tiny_model_dir, target_is_directory=True)
    return d


@pytest.fixture(scope="module")
def replicas(model_dir) -> Iterator[list[Service]]:
    svcs = [Service(model_dir, scheduler={"metrics_port": 0}, num_kv_blocks=96, block_size=16) for _ in range(2)]
    yield svcs
    for s in svcs:
        if s.loop.thread.is_alive():
            s.stop()


def gateway(replicas: list[Service], model_dir, tmp_path, *args: str) -> Gateway:
    return Gateway([s.addr for s in replicas], model_dir, tmp_path / "smg.log", *args)


def openai_client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ours(svc: Service, **kwargs: object) -> list[int]:
    with Client(svc.addr) as c:
        return [t for m in c.generate(**kwargs) for t in m.token_ids]


def hits(svc: Service) -> tuple[int, int]:
    """(prefix-cache queries, hits) in blocks, read on the service's own loop."""

    async def read() -> tuple[int, int]:
        blocks = svc.engine.core.scheduler.blocks
        return blocks.num_queries, blocks.num_hits

    return svc.call(read())


def test_openai_api_through_the_gateway(replicas, model_dir, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    gw = gateway(replicas, model_dir, tmp_path, "--policy", "round_robin")
    try:
        api = openai_client(gw)
        assert [m.id for m in api.models.list().data] == [MODEL]
        prompt = "The quick brown fox"
        ids = ours(replicas[0], prompt=prompt, max_tokens=12, temperature=0.0)
        expected = tok.decode(ids, skip_special_tokens=True)
        for _ in range(2):  # round robin: each replica serves one
            whole = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            assert whole.choices[0].text == expected
            assert whole.usage.completion_tokens == 12
            parts = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
            assert "".join(p.choices[0].text for p in parts) == expected

        messages = [{"role": "user", "content": "Paged attention stores keys and values."}]
        ids = ours(replicas[1], messages=messages, max_tokens=10, temperature=0.0)
        expected = tok.decode(ids, skip_special_tokens=True)
        chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == expected
        stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

        # n samples share the prompt's full blocks: each sample after the first hits them all.
        before = [hits(s)[1] for s in replicas]
        prompt = "A scheduler batches requests; a worker runs the forward pass on the GPU."
        blocks = (len(tok.encode(prompt)) - 1) // 16
        assert blocks >= 2
        runs = [
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, n=3, seed=7)
            for _ in range(2)
        ]
        texts = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in runs]
        assert texts[0] == texts[1] and len(texts[0]) == 3
        assert len(set(texts[0])) == 3  # seeded, reproducible, and three different samples
        assert sum(hits(s)[1] - b for s, b in zip(replicas, before, strict=True)) >= 2 * 2 * blocks
    finally:
        gw.stop()


def test_cache_aware_routing_follows_kv_events(replicas, model_dir, tmp_path) -> None:
    gw = gateway(
        replicas,
        model_dir,
        tmp_path,
        *("--policy", "cache_aware", "--worker-warmup-secs", "0", "--worker-warmup-divert-every", "0"),
    )
    subs = [KvSubscriber(s.addr) for s in replicas]
    try:
        api = openai_client(gw)
        shared = "Prefix caching reuses blocks that hold the same tokens. " * 8  # about six blocks
        api.completions.create(model=MODEL, prompt=shared + "0", max_tokens=2, temperature=0)
        for sub, svc in zip(subs, replicas, strict=True):
            sub.wait_for(cached_state(svc))
        before = [hits(s) for s in replicas]
        holder = max(range(2), key=lambda i: len(subs[i].blocks()))
        for i in range(1, 5):
            api.completions.create(model=MODEL, prompt=shared + str(i), max_tokens=2, temperature=0)
        after = [hits(s) for s in replicas]
        other = 1 - holder
        assert after[holder][1] - before[holder][1] >= 4 * 5  # every request found the shared blocks there
        assert after[other] == before[other]  # and none went to the other replica
        for sub, svc in zip(subs, replicas, strict=True):
            sub.wait_for(cached_state(svc))  # the events describe exactly the cached blocks, tokens included
    finally:
        for sub in subs:
            sub.close()
        gw.stop()


def cached_state(svc: Service) -> dict[int, int]:
    async def read() -> dict[int, int]:
        return dict(svc.engine.core.scheduler.blocks.cached)

    return svc.call(read())


def scrape(svc: Service) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:") and s.labels.get("model_name") == MODEL and "le" not in s.labels:
                out[s.name] = s.value
    return out


def test_metrics_under_load_then_one_replica_killed(replicas, model_dir, tmp_path) -> None:
    gw = gateway(replicas, model_dir, tmp_path, "--policy", "round_robin")
    try:
        api = openai_client(gw)
        before = [scrape(s) for s in replicas]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                prompt = f"Large language models generate text one token at a time. {i}"
                api.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=False)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        busy = False
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            now = [scrape(s) for s in replicas]
            busy = busy or any(m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] > 0 for m in now)
            for m in now:
                assert set(VLLM_NAMES) <= set(m), set(VLLM_NAMES) - set(m)
                assert 0.0 <= m["vllm:kv_cache_usage_perc"] <= 1.0
        for t in threads:
            t.join(timeout=60)
        assert not errors and busy
        after = [scrape(s) for s in replicas]
        assert (
            sum(a["vllm:e2e_request_latency_seconds_count"] for a in after)
            - sum(b["vllm:e2e_request_latency_seconds_count"] for b in before)
            == 8
        )
        assert (
            sum(a["vllm:inter_token_latency_seconds_count"] for a in after)
            - sum(b["vllm:inter_token_latency_seconds_count"] for b in before)
            == 8 * 39
        )
        for a in after:
            assert a["vllm:num_requests_running"] == a["vllm:num_requests_waiting"] == 0
            assert a["vllm:prefix_cache_hits_total"] <= a["vllm:prefix_cache_queries_total"]

        replicas[1].stop()  # its gRPC servers go away mid-service
        for i in range(6):
            out = api.completions.create(
                model=MODEL, prompt=f"After the loss {i}", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
            )
            assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
        healthy = [w for w in get_json(f"{gw.url}/workers")["workers"] if w.get("is_healthy")]
        assert len(healthy) >= 1
    finally:
        gw.stop()
