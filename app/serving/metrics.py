"""The serving engine's metrics: thin names over `app.metrics` (the service's one registry,
exposed at /metrics)."""

from __future__ import annotations

from app import metrics as m


def batch(size: int, distinct_adapters: int) -> None:
    m.observe_batch(size, distinct_adapters)


def queue_depth(n: int) -> None:
    m.set_queue_depth(n)


def tokens(n: int, seconds: float) -> None:
    m.record_tokens(n, seconds)


def cache_hit() -> None:
    m.adapter_cache_hit()


def cache_miss() -> None:
    m.adapter_cache_miss()


def cache_size(n: int) -> None:
    m.set_adapter_cache_size(n)


def rejected() -> None:
    m.rejected("queue_full")
