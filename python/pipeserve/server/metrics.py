"""The server's Prometheus metrics (`prometheus_client`): request counters and latency histograms
kept by the front end, and gauges read from stage 0's latest stats when scraped.

With several front-end processes, prometheus_client's multiprocess mode keeps each process's
counters in files of one directory (PROMETHEUS_MULTIPROC_DIR, set by the launcher before any of
them imports prometheus_client), and whichever process is scraped sums them all."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pipeserve.ipc.messages import TokenOut

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; latencies of a small CPU model and of a large one behind several stages both fit
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    """One registry per server (two servers in one process do not share counters)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], kv_slots: int) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipeserve_requests", "Finished requests by outcome.", ["status"], registry=r
        )
        for status in ("ok", "error", "aborted"):
            self.requests.labels(status)
        self.prompt_tokens = Counter("pipeserve_prompt_tokens", "Prompt tokens.", registry=r)
        self.generation_tokens = Counter(
            "pipeserve_generation_tokens", "Generated tokens.", registry=r
        )
        self.time_to_first_token = Histogram(
            "pipeserve_time_to_first_token_seconds",
            "From a request's submission to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "pipeserve_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "pipeserve_e2e_request_latency_seconds",
            "From a request's submission to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "pipeserve_request_queue_time_seconds",
            "Seconds a request waited at stage 0 before its first microbatch, as stage 0 reports.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.unfinished = Gauge(
            "pipeserve_unfinished_requests",
            "Requests the server holds.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stage = _StageCollector(stats, kv_slots, self.started)
        r.register(self.stage)

    def count_prompts(self, prompts: list[list[int]]) -> None:
        """Counts each prompt once, however many choices (n) it has, as OpenAI's usage does."""
        self.prompt_tokens.inc(sum(len(p) for p in prompts))

    def track(self) -> RequestTrack:
        """A request submitted now: the returned track observes its outputs and its end."""
        return RequestTrack(self)

    def render(self) -> bytes:
        shared = os.environ.get(MULTIPROC_ENV)
        if not shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every process's files, summed, and this one's stage view
        MultiProcessCollector(registry, path=shared)
        registry.register(self.stage)
        return generate_latest(registry)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class RequestTrack:
    """One request's token count and times (`time.monotonic()`), for the latency histograms."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.submitted = time.monotonic()
        self.first: float | None = None
        self.tokens = 0

    def output(self, out: TokenOut) -> None:
        if out.token_ids and self.first is None:
            self.first = time.monotonic()
        if out.queue_time_s is not None:
            self.metrics.queue_time.observe(out.queue_time_s)
        self.tokens += len(out.token_ids)  # the counter is bumped once per step (Frontend)

    def finished(self, ok: bool) -> None:
        m, end = self.metrics, time.monotonic()
        m.requests.labels("ok" if ok else "error").inc()
        if not ok:
            return
        m.e2e_latency.observe(end - self.submitted)
        if self.first is not None:
            m.time_to_first_token.observe(self.first - self.submitted)
            if self.tokens > 1:
                m.time_per_output_token.observe((end - self.first) / (self.tokens - 1))

    def aborted(self) -> None:
        self.metrics.requests.labels("aborted").inc()


class _StageCollector:
    """Gauges and counters from stage 0's latest stats, read at scrape time. Before stage 0 has
    sent any, the KV pool is reported whole (its size is known from start-up)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], kv_slots: int, started: float) -> None:
        self.stats, self.kv_slots, self.started = stats, kv_slots, started

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield _gauge("pipeserve_queue_depth", "Requests waiting at stage 0.", s.get("waiting", 0))
        yield _gauge("pipeserve_running_requests", "Requests running.", s.get("running", 0))
        yield _gauge("pipeserve_kv_slots_total", "KV cache slots (tokens).", self.kv_slots)
        free = s.get("free_slots", self.kv_slots)
        yield _gauge("pipeserve_kv_slots_free", "Free KV cache slots.", free)
        yield _counter("pipeserve_preemptions", "Preempted requests.", s.get("num_preemptions", 0))
        yield _gauge(
            "pipeserve_kv_slots_cached",
            "KV slots held by the prefix cache.",
            s.get("cached_slots", 0),
        )
        hits, queried = s.get("num_cached_tokens", 0), s.get("num_admitted_tokens", 0)
        yield _counter(
            "pipeserve_prefix_cache_hit_tokens",
            "Prompt tokens admitted from the prefix cache.",
            hits,
        )
        yield _counter(
            "pipeserve_prefix_cache_query_tokens", "Prompt tokens admitted, cached or not.", queried
        )
        yield _gauge(
            "pipeserve_prefix_cache_hit_rate",
            "Hit tokens over query tokens so far.",
            hits / max(1, queried),
        )
        yield _counter(
            "pipeserve_microbatches", "Microbatches built.", s.get("num_microbatches", 0)
        )
        busy = s.get("stage_busy_s", [])
        seconds = CounterMetricFamily(
            "pipeserve_stage_busy_seconds",
            "Seconds each pipeline stage spent computing.",
            labels=["stage"],
        )
        ratio = GaugeMetricFamily(
            "pipeserve_stage_busy_ratio", "Busy seconds over uptime, per stage.", labels=["stage"]
        )
        uptime = max(time.time() - self.started, 1e-9)
        for i, b in enumerate(busy):
            seconds.add_metric([str(i)], b)
            ratio.add_metric([str(i)], round(b / uptime, 6))
        yield seconds
        yield ratio


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)
