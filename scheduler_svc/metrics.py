"""Prometheus metrics of one engine, in a registry of its own (tests run several engines per process).

Each step costs one histogram observation (its worker time, measured by the core). Per-request
numbers are observed by the request's own coroutine, on its first and last message. Queue lengths,
KV blocks and prefix-cache counts are the core's stats as of its last step, and they and the token
counts are read only when Prometheus scrapes, so they cost nothing per step.

Beside ours, the vLLM-compatible `vllm:` metrics with a `model_name` label, so that dashboards and
routers built for vLLM (the Gateway API Inference Extension's endpoint picker) read us unchanged.
Their histograms are plain bucket counts without a lock (only the event loop's thread observes
them), which also lets one call count a message's n tokens of inter-token latency.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from scheduler_svc.messages import CoreInfo, CoreStats, WorkersBack

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

# "error": the request failed after it was queued (a worker died, or the drain timed out).
FINISH_REASONS = ("stop", "length", "abort", "error")
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Buckets:
    """A histogram's bucket counts and sum, observed from one thread and read at scrape time."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Counts `n` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, model: str) -> HistogramMetricFamily:
        cum = list(accumulate(self.counts))
        buckets = [(str(b), c) for b, c in zip(self.bounds, cum, strict=False)] + [("+Inf", cum[-1])]
        f = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        f.add_metric([model], buckets, self.sum)
        return f


@dataclass(frozen=True)
class Load:
    """The engine's state as the metrics and the status line read it."""

    info: CoreInfo
    stats: CoreStats  # as of the core's last step
    waiting: int  # requests queued, counting those the core has not seen yet


class Metrics:
    def __init__(self, load: Callable[[], Load | None], model_name: str = "", prefix_caching: bool = True) -> None:
        """`load`: the engine's state now; None until its workers are ready. `model_name` labels the
        `vllm:` metrics; `prefix_caching` is reported in vllm:cache_config_info."""
        self.load = load
        self.model_name = model_name
        self.prefix_caching = prefix_caching
        self.registry = CollectorRegistry()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.worker_restarts = 0  # times the worker group came back after losing a rank
        self.requests_resumed = 0
        self.tokens_recomputed = 0
        self.recovery_seconds = 0.0  # of recoveries that ended
        self.lost_since: float | None = None  # while a rank is lost

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"nanovllm_{name}_seconds", doc, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token", "From arrival to the first streamed token.", TTFT_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token", "Mean time between output tokens of a request (2+ tokens).", TPOT_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency", "From arrival to the last message of a request.", E2E_BUCKETS)
        self.step_time = histogram(
            "step_duration", "Worker time of one step, send or previous result to result.", STEP_BUCKETS
        )
        self.vllm_ttft = Buckets("vllm:time_to_first_token_seconds", "From arrival to the first token.", TTFT_BUCKETS)
        self.vllm_itl = Buckets("vllm:inter_token_latency_seconds", "Between successive tokens.", TPOT_BUCKETS)
        self.vllm_e2e = Buckets("vllm:e2e_request_latency_seconds", "From arrival to the last token.", E2E_BUCKETS)
        self.vllm_queue = Buckets(
            "vllm:request_queue_time_seconds", "From arrival in the core to first scheduled.", QUEUE_BUCKETS
        )
        self.registry.register(_StateCollector(self))
        self.registry.register(_VllmCollector(self))
        self._http: WSGIServer | None = None

    def step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def queued(self, seconds: tuple[float, ...]) -> None:
        """Queue times of the requests the core scheduled for the first time."""
        for q in seconds:
            self.vllm_queue.observe(q)

    def lost(self) -> None:
        if self.lost_since is None:
            self.lost_since = time.monotonic()

    def back(self, event: WorkersBack) -> None:
        self.worker_restarts += 1
        self.requests_resumed += event.resumed
        self.tokens_recomputed += event.recomputed
        self.recovery_seconds += event.seconds
        self.lost_since = None

    def seconds_in_recovery(self) -> float:
        since = self.lost_since
        return self.recovery_seconds + (time.monotonic() - since if since is not None else 0.0)

    # ---- a request's hooks, called from its own coroutine ----

    def first_token(self, arrival: float, now: float, prompt_tokens: int) -> None:
        self.ttft.observe(now - arrival)
        self.vllm_ttft.observe(now - arrival)
        self.prompt_tokens += prompt_tokens

    def streamed(self, num_tokens: int, gap: float | None) -> None:
        """`gap`: seconds since the request's previous message; None for its first, whose later
        tokens (if it carries several) came with the first one."""
        self.generation_tokens += num_tokens
        if gap is None:
            self.vllm_itl.observe(0.0, max(num_tokens - 1, 0))
        elif num_tokens:  # an aborted request's last message may carry none
            self.vllm_itl.observe(gap / num_tokens, num_tokens)

    def finish(self, reason: str, arrival: float, first: float, last: float, num_tokens: int) -> None:
        """`first`/`last`: when the first and last tokens were streamed (0 when none was)."""
        self.finished[reason] += 1
        self.e2e.observe(time.monotonic() - arrival)
        self.vllm_e2e.observe(time.monotonic() - arrival)
        if num_tokens > 1:
            self.tpot.observe((last - first) / (num_tokens - 1))

    # ---- HTTP ----

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP on a background thread; returns the bound port."""
        try:
            self._http, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StateCollector(Collector):
    """Reads counts and the scheduler's state at scrape time (from the HTTP thread; only len()s and ints)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "nanovllm_requests", "Finished requests by finish reason.", labels=["finish_reason"]
        )
        for reason, count in m.finished.items():
            requests.add_metric([reason], count)
        yield requests
        yield CounterMetricFamily("nanovllm_prompt_tokens", "Prompt tokens of requests that started.", m.prompt_tokens)
        yield CounterMetricFamily("nanovllm_generation_tokens", "Output tokens streamed.", m.generation_tokens)
        yield CounterMetricFamily(
            "nanovllm_worker_restarts", "Times the worker group came back after a rank was lost.", m.worker_restarts
        )
        yield CounterMetricFamily(
            "nanovllm_requests_resumed", "Requests recomputed on a worker group that came back.", m.requests_resumed
        )
        yield CounterMetricFamily(
            "nanovllm_tokens_recomputed", "Known tokens of resumed requests, recomputed.", m.tokens_recomputed
        )
        yield CounterMetricFamily(
            "nanovllm_worker_recovery_seconds", "Time spent with a worker rank lost.", m.seconds_in_recovery()
        )
        load = m.load()
        if load is None:
            return
        info, stats = load.info, load.stats
        up = 0 if m.lost_since is not None else 1
        yield GaugeMetricFamily("nanovllm_workers_up", "1 while every worker rank is connected.", up)
        yield GaugeMetricFamily("nanovllm_num_requests_waiting", "Requests queued (or preempted).", load.waiting)
        yield GaugeMetricFamily("nanovllm_num_requests_running", "Sequences holding KV blocks.", stats.running)
        used = info.num_blocks - stats.blocks_free
        yield GaugeMetricFamily("nanovllm_kv_blocks_used", "KV blocks referenced by a sequence.", used)
        yield GaugeMetricFamily("nanovllm_kv_blocks_free", "KV blocks free (cached ones included).", stats.blocks_free)
        queries, hits = stats.prefix_queries, stats.prefix_hits
        yield CounterMetricFamily("nanovllm_prefix_cache_queries", "Full prompt blocks looked up.", queries)
        yield CounterMetricFamily("nanovllm_prefix_cache_hits", "Prompt blocks found cached.", hits)
        yield GaugeMetricFamily("nanovllm_prefix_cache_hit_rate", "Hits / queries since start.", stats.hit_rate)
        yield CounterMetricFamily("nanovllm_preemptions", "Sequences preempted for KV blocks.", stats.preemptions)


class _VllmCollector(Collector):
    """vLLM's names for the same numbers (its prefix-cache counters count tokens, not blocks)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        model = m.model_name
        for b in (m.vllm_ttft, m.vllm_itl, m.vllm_e2e, m.vllm_queue):
            yield b.family(model)
        load = m.load()
        if load is None:
            return
        info, stats = load.info, load.stats

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            f = kind(name, doc, labels=["model_name"])
            f.add_metric([model], value)
            return f

        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Requests running.", stats.running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting.", load.waiting)
        usage = (info.num_blocks - stats.blocks_free) / info.num_blocks
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full.", usage)
        bs = info.block_size
        queries, hits = stats.prefix_queries * bs, stats.prefix_hits * bs
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries", "Prompt tokens looked up.", queries)
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits", "Prompt tokens found cached.", hits)
        labels = {
            "model_name": model,
            "block_size": str(bs),
            "num_gpu_blocks": str(info.num_blocks),
            "enable_prefix_caching": str(m.prefix_caching),
        }
        config = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's configuration.", labels=list(labels))
        config.add_metric(list(labels.values()), 1.0)
        yield config
