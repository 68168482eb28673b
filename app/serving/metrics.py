"""Serving metrics, registered in prometheus_client's default registry (what /metrics exposes).

If `app.metrics` (the service's metrics module) already defines a metric of the same name, that
one is reused, so the two modules never register a name twice.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram


def _get_or_create(cls, name: str, doc: str, **kw):
    existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup exists
    if existing is None and cls is Counter:
        existing = REGISTRY._names_to_collectors.get(name + "_total")  # noqa: SLF001
    if existing is not None:
        return existing
    return cls(name, doc, **kw)


BATCH_SIZE = _get_or_create(
    Histogram, "prefixd_serving_batch_size", "Rows per generation batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_ADAPTERS = _get_or_create(
    Histogram, "prefixd_serving_batch_adapters", "Distinct prefixes (adapters or none) per batch",
    buckets=(1, 2, 4, 8, 16, 32),
)
QUEUE_DEPTH = _get_or_create(Gauge, "prefixd_serving_queue_depth", "Rows waiting for a batch")
GENERATED_TOKENS = _get_or_create(Counter, "prefixd_serving_generated_tokens", "Tokens generated")
TOKENS_PER_S = _get_or_create(Gauge, "prefixd_serving_tokens_per_second", "Tokens/s of the last batch")
CACHE_HITS = _get_or_create(Counter, "prefixd_adapter_cache_hits", "Adapter cache hits")
CACHE_MISSES = _get_or_create(Counter, "prefixd_adapter_cache_misses", "Adapter cache misses")
REJECTED = _get_or_create(Counter, "prefixd_serving_rejected", "Requests refused because the queue was full")
BASE_LOADED = _get_or_create(Gauge, "prefixd_serving_base_loaded", "1 when a base model is loaded")
