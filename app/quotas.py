"""Per-tenant quotas: defaults from the settings, overrides in `tenant.quotas` (admin PATCH).

| quota                 | default setting (env)            | checked                                   |
|-----------------------|----------------------------------|-------------------------------------------|
| `storage_bytes`       | `QUOTA_STORAGE_BYTES`            | file upload (stored bytes + this file)    |
| `files`               | `QUOTA_FILES`                    | file upload                               |
| `adapters`            | `QUOTA_ADAPTERS`                 | adapter import; prefix job creation       |
| `running_jobs`        | `MAX_RUNNING_JOBS_PER_TENANT`    | job start (more jobs wait in `queued`)    |
| `requests_per_minute` | `QUOTA_REQUESTS_PER_MINUTE`      | every inference request                   |
| `tokens_per_minute`   | `QUOTA_TOKENS_PER_MINUTE`        | every inference request, after tokenizing |

A value of 0 means unlimited (as for `running_jobs` in `app/jobs/runner.py`).

Over a quota the answer is 429 with `Retry-After` and the OpenAI envelope; the message names the
quota. Stock quotas (storage, files, adapters) answer `type: "insufficient_quota"` with
`x-should-retry: false` (waiting does not help: delete something or ask for a higher quota); rate
quotas answer `type: "rate_limit_error"` with the seconds until the window has room.

Rates are a sliding window of one minute in one-second buckets, per tenant, held in this API
process (`RateLimiter`, memory O(tenants x 60)). With K API replicas each one enforces the quota
on its own, so a tenant can get up to K times the quota in total: set the per-replica quota to
quota / K. Tokens are charged when the request is admitted: the prompt tokens plus `max_tokens`
for every choice (what the request may use, as OpenAI's rate limiter estimates it), so a
request's charge is known before any work is done. The stock quotas are checked at admission
against the database counts: two uploads racing may both pass; the next one is refused.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from sqlalchemy import func, select

from app.api.errors import APIError

QUOTA_SETTINGS = {
    "storage_bytes": "quota_storage_bytes",
    "files": "quota_files",
    "adapters": "quota_adapters",
    "running_jobs": "max_running_jobs_per_tenant",
    "requests_per_minute": "quota_requests_per_minute",
    "tokens_per_minute": "quota_tokens_per_minute",
}
WINDOW_S = 60
_NO_RETRY = {"x-should-retry": "false"}


class QuotaExceeded(APIError):
    """429 naming the quota; an `APIError`, so it becomes the OpenAI envelope."""

    def __init__(self, quota: str, message: str, retry_after_s: int, *, rate: bool):
        headers = {"Retry-After": str(max(1, int(retry_after_s)))}
        if not rate:
            headers.update(_NO_RETRY)
        super().__init__(429, message, type="rate_limit_error" if rate else "insufficient_quota",
                         code=f"{quota}_quota_exceeded", headers=headers)
        self.quota = quota
        self.retry_after_s = max(1, int(retry_after_s))


def limit_of(tenant, settings, quota: str) -> int:
    """The tenant's effective limit (its override, else the setting); 0 = unlimited."""
    override = (getattr(tenant, "quotas", None) or {}).get(quota)
    value = override if override is not None else getattr(settings, QUOTA_SETTINGS[quota])
    return max(0, int(value or 0))


def effective_quotas(tenant, settings) -> dict[str, int]:
    return {q: limit_of(tenant, settings, q) for q in QUOTA_SETTINGS}


def _rejected(quota: str) -> None:
    try:
        from app import metrics

        metrics.rejected(f"quota_{quota}")
    except Exception:  # noqa: BLE001 - metrics never fail a request
        pass


# ----------------------------------------------------------------------------- stock quotas


def check_upload(session, tenant, settings, size: int) -> None:
    """Before a file is stored: one more file of `size` bytes must fit `files` and `storage_bytes`."""
    from app.store.models import File

    files, stored = session.execute(
        select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant.id)
    ).one()
    files, stored = int(files), int(stored)
    max_files = limit_of(tenant, settings, "files")
    if max_files and files + 1 > max_files:
        _rejected("files")
        raise QuotaExceeded("files", f"files quota of {max_files} exceeded: the tenant has {files} files; "
                                     "delete files or ask the administrator for a higher quota", 60, rate=False)
    max_bytes = limit_of(tenant, settings, "storage_bytes")
    if max_bytes and stored + size > max_bytes:
        _rejected("storage_bytes")
        raise QuotaExceeded("storage_bytes",
                            f"storage_bytes quota of {max_bytes} exceeded: {stored} bytes stored + {size} in this "
                            "file; delete files or ask the administrator for a higher quota", 60, rate=False)


def check_adapter_count(session, tenant, settings) -> None:
    """Before an adapter is imported, or a prefix job (which makes one) is created: the tenant's
    adapters plus its prefix jobs still to finish must stay within `adapters`."""
    from app.store.models import Job, ModelRecord

    limit = limit_of(tenant, settings, "adapters")
    if not limit:
        return
    adapters = int(session.scalar(select(func.count(ModelRecord.id)).where(
        ModelRecord.tenant_id == tenant.id, ModelRecord.kind == "adapter")) or 0)
    pending = int(session.scalar(select(func.count(Job.id)).where(
        Job.tenant_id == tenant.id, Job.kind == "prefix",
        Job.status.in_(("validating_files", "queued", "running")))) or 0)
    if adapters + pending + 1 > limit:
        _rejected("adapters")
        what = f"{adapters} adapters" + (f" and {pending} prefix jobs that will make one" if pending else "")
        raise QuotaExceeded("adapters", f"adapters quota of {limit} exceeded: the tenant has {what}; "
                                        "delete adapters or ask the administrator for a higher quota",
                            60, rate=False)


# ----------------------------------------------------------------------------- rates


class SlidingWindow:
    """Amounts per key over the last `window_s` seconds, in one-second buckets (thread-safe)."""

    def __init__(self, window_s: int = WINDOW_S, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}
        self._lock = threading.Lock()

    def _expire(self, key: str, now_s: int) -> deque[list[int]]:
        q = self._buckets.get(key)
        if q is None:
            q = self._buckets[key] = deque()
        while q and q[0][0] <= now_s - self.window_s:
            q.popleft()
        return q

    def used(self, key: str) -> int:
        with self._lock:
            now_s = math.floor(self.clock())
            q = self._expire(key, now_s)
            total = sum(c for _, c in q)
            if not q:
                self._buckets.pop(key, None)
            return total

    def try_add(self, key: str, amount: int, limit: int) -> float | None:
        """Record `amount` and return None if the window stays within `limit` (0 = unlimited);
        else record nothing and return the seconds until it would fit (inf if it never can)."""
        with self._lock:
            now = self.clock()
            now_s = math.floor(now)
            q = self._expire(key, now_s)
            if limit and amount > limit:
                return math.inf
            used = sum(c for _, c in q)
            if limit and used + amount > limit:
                need, freed = used + amount - limit, 0
                for sec, count in q:
                    freed += count
                    if freed >= need:
                        return max(0.0, sec + self.window_s - now)
                return float(self.window_s)  # pragma: no cover - the loop always frees enough
            if amount:
                if q and q[-1][0] == now_s:
                    q[-1][1] += amount
                else:
                    q.append([now_s, amount])
            return None


class RateLimiter:
    """`requests_per_minute` and `tokens_per_minute` for every tenant of this process."""

    def __init__(self, clock=time.monotonic):
        self.requests = SlidingWindow(clock=clock)
        self.tokens = SlidingWindow(clock=clock)

    def check_request(self, tenant, settings) -> None:
        limit = limit_of(tenant, settings, "requests_per_minute")
        wait = self.requests.try_add(tenant.id, 1, limit)
        if wait is not None:
            _rejected("requests_per_minute")
            raise QuotaExceeded("requests_per_minute",
                                f"requests_per_minute quota of {limit} exceeded; retry after {_secs(wait)} s",
                                _secs(wait), rate=True)

    def charge_tokens(self, tenant, settings, tokens: int) -> None:
        limit = limit_of(tenant, settings, "tokens_per_minute")
        wait = self.tokens.try_add(tenant.id, int(tokens), limit)
        if wait is None:
            return
        _rejected("tokens_per_minute")
        if math.isinf(wait):
            raise QuotaExceeded("tokens_per_minute",
                                f"tokens_per_minute quota of {limit} exceeded: this request alone needs {tokens} "
                                "tokens (prompt + max_tokens x choices); reduce max_tokens, n or the prompt",
                                WINDOW_S, rate=True)
        raise QuotaExceeded("tokens_per_minute",
                            f"tokens_per_minute quota of {limit} exceeded: this request needs {tokens} tokens; "
                            f"retry after {_secs(wait)} s", _secs(wait), rate=True)

    def usage(self, tenant_id: str) -> dict[str, int]:
        return {"requests_per_minute": self.requests.used(tenant_id),
                "tokens_per_minute": self.tokens.used(tenant_id)}


def _secs(wait: float) -> int:
    return max(1, math.ceil(wait))


_limiter_lock = threading.Lock()


def limiter(app) -> RateLimiter:
    """The process's limiter, on `app.state` (created on first use)."""
    lim = getattr(app.state, "rate_limiter", None)
    if lim is None:
        with _limiter_lock:
            lim = getattr(app.state, "rate_limiter", None)
            if lim is None:
                lim = app.state.rate_limiter = RateLimiter()
    return lim


def check_request_rate(request, tenant) -> None:
    """At the start of an inference route: one request against `requests_per_minute`."""
    limiter(request.app).check_request(tenant, request.app.state.settings)


def charge_tokens(request, tenant, tokens: int) -> None:
    """Once the prompt is tokenized: prompt + max_tokens x choices against `tokens_per_minute`."""
    limiter(request.app).charge_tokens(tenant, request.app.state.settings, tokens)
