"""Unit tests of app/quotas.py: the sliding-window limiter and effective quotas (no service)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from app.api.errors import APIError
from app.config import Settings
from app.quotas import RateLimiter, SlidingWindow, effective_quotas, limit_of


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_window_admits_up_to_the_limit_then_says_when():
    clock = Clock()
    w = SlidingWindow(60, clock=clock)
    for _ in range(3):
        assert w.try_add("a", 1, 3) is None
        clock.t += 10
    # t = 1030: the buckets at 1000, 1010, 1020 hold 1 each; the first leaves at 1060
    assert w.try_add("a", 1, 3) == pytest.approx(30)
    assert w.used("a") == 3
    clock.t = 1059.5
    assert w.try_add("a", 1, 3) == pytest.approx(0.5)
    clock.t = 1060.0
    assert w.try_add("a", 1, 3) is None
    assert w.used("a") == 3


def test_window_keys_are_independent_and_zero_is_unlimited():
    clock = Clock()
    w = SlidingWindow(60, clock=clock)
    assert w.try_add("a", 5, 5) is None
    assert w.try_add("a", 1, 5) is not None
    assert w.try_add("b", 5, 5) is None
    for _ in range(1000):
        assert w.try_add("c", 7, 0) is None
    assert w.used("c") == 7000


def test_window_amounts_and_never_fitting():
    clock = Clock()
    w = SlidingWindow(60, clock=clock)
    assert math.isinf(w.try_add("a", 11, 10))
    assert w.used("a") == 0  # a refusal records nothing
    assert w.try_add("a", 6, 10) is None
    clock.t += 5
    assert w.try_add("a", 3, 10) is None
    # 9 used; 4 more needs the first bucket (6) to leave, at 1060
    assert w.try_add("a", 4, 10) == pytest.approx(55)
    # 1 more fits
    assert w.try_add("a", 1, 10) is None


def test_window_memory_is_bounded_by_the_window():
    clock = Clock()
    w = SlidingWindow(60, clock=clock)
    for _ in range(10_000):
        w.try_add("a", 1, 0)
        clock.t += 0.05
    assert len(w._buckets["a"]) <= 61


def _tenant(**quotas):
    return SimpleNamespace(id="t1", quotas=quotas)


def test_effective_quotas_override_the_settings():
    s = Settings(quota_requests_per_minute=600, quota_files=10, max_running_jobs_per_tenant=2)
    t = _tenant(files=3, requests_per_minute=0)
    q = effective_quotas(t, s)
    assert q["files"] == 3 and q["requests_per_minute"] == 0 and q["running_jobs"] == 2
    assert set(q) == {"storage_bytes", "files", "adapters", "running_jobs", "requests_per_minute",
                      "tokens_per_minute"}
    assert limit_of(_tenant(), s, "files") == 10


def test_defaults_never_hinder_one_interactive_user():
    s = Settings()
    assert s.quota_requests_per_minute >= 600 and s.quota_tokens_per_minute >= 200_000
    assert s.max_queued_requests >= 256 and s.max_n_epochs >= 100 and s.max_num_virtual_tokens >= 512


def test_rate_limiter_raises_429_naming_the_quota():
    clock = Clock()
    lim = RateLimiter(clock=clock)
    s = Settings(quota_requests_per_minute=2, quota_tokens_per_minute=100)
    t = _tenant()
    lim.check_request(t, s)
    lim.check_request(t, s)
    with pytest.raises(APIError) as e:
        lim.check_request(t, s)
    err = e.value
    assert err.status_code == 429 and err.type == "rate_limit_error"
    assert err.code == "requests_per_minute_quota_exceeded"
    assert "requests_per_minute quota of 2 exceeded" in err.message
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    lim.charge_tokens(t, s, 80)
    with pytest.raises(APIError) as e:
        lim.charge_tokens(t, s, 30)
    assert "tokens_per_minute quota of 100 exceeded" in e.value.message
    with pytest.raises(APIError) as e:
        lim.charge_tokens(t, s, 101)
    assert "alone needs 101 tokens" in e.value.message and e.value.headers["Retry-After"] == "60"
    assert lim.usage("t1") == {"requests_per_minute": 2, "tokens_per_minute": 80}
    clock.t += 61
    lim.check_request(t, s)
    lim.charge_tokens(t, s, 100)
