"""Prometheus metrics in one registry, plus helpers the engine and the routes call.

Everything here is cheap and thread-safe (prometheus_client). The API process exposes
`/metrics`; the worker has no HTTP endpoint, and job counts come from the database at scrape time
(`set_jobs_by_status`).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for /metrics)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "prefixd_http_requests_total", "HTTP requests by route template, method and status",
    ["method", "route", "status"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "prefixd_http_request_duration_seconds", "HTTP request latency by route template",
    ["method", "route"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BATCH_SIZE = Histogram(
    "prefixd_batch_size", "Rows per forward batch in the serving engine", registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_ADAPTERS = Histogram(
    "prefixd_batch_distinct_adapters", "Distinct adapters in one batch", registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32),
)
QUEUE_DEPTH = Gauge("prefixd_queue_depth", "Requests waiting for a batch slot", registry=REGISTRY)
TOKENS_GENERATED = Counter("prefixd_generated_tokens_total", "Tokens generated", registry=REGISTRY)
TOKENS_PER_SECOND = Gauge("prefixd_tokens_per_second", "Generation throughput of the last batch",
                          registry=REGISTRY)
ADAPTER_CACHE_HITS = Counter("prefixd_adapter_cache_hits_total", "Adapter cache hits", registry=REGISTRY)
ADAPTER_CACHE_MISSES = Counter("prefixd_adapter_cache_misses_total", "Adapter cache misses", registry=REGISTRY)
ADAPTER_CACHE_SIZE = Gauge("prefixd_adapter_cache_size", "Adapters held in the cache", registry=REGISTRY)
JOBS_BY_STATUS = Gauge("prefixd_jobs", "Jobs by status (from the database at scrape time)", ["status"],
                       registry=REGISTRY)
REJECTED = Counter("prefixd_rejected_total", "Requests refused for load or quota", ["reason"], registry=REGISTRY)

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)


def observe_batch(size: int, distinct_adapters: int | None = None) -> None:
    BATCH_SIZE.observe(size)
    if distinct_adapters is not None:
        BATCH_ADAPTERS.observe(distinct_adapters)


def set_queue_depth(n: int) -> None:
    QUEUE_DEPTH.set(n)


def record_tokens(n: int, seconds: float | None = None) -> None:
    TOKENS_GENERATED.inc(n)
    if seconds and seconds > 0:
        TOKENS_PER_SECOND.set(n / seconds)


def adapter_cache_hit() -> None:
    ADAPTER_CACHE_HITS.inc()


def adapter_cache_miss() -> None:
    ADAPTER_CACHE_MISSES.inc()


def set_adapter_cache_size(n: int) -> None:
    ADAPTER_CACHE_SIZE.set(n)


def rejected(reason: str) -> None:
    REJECTED.labels(reason).inc()


def set_jobs_by_status(counts: dict[str, int]) -> None:
    for s in set(JOB_STATUSES) | set(counts):
        JOBS_BY_STATUS.labels(s).set(counts.get(s, 0))


def render() -> bytes:
    return generate_latest(REGISTRY)
