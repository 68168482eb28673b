"""Per-tenant quotas: defaults from the settings, overrides in `tenant.quotas`, and the rate windows
(in process, or in Redis shared by every replica). Over a quota, domain errors (`QuotaExceeded`,
`RateLimiterUnavailable`) that app/api/errors.py maps to 429 / 503.

The table of quotas, where each is checked, and the window design are in docs/design/QUOTAS.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque

from sqlalchemy import func, select, update

from app.observability import metrics
from app.store.tables import File, Job, ModelRecord, Tenant

log = logging.getLogger("prefixd.quotas")

QUOTA_SETTINGS = {
    "storage_bytes": "quota_storage_bytes",
    "files": "quota_files",
    "adapters": "quota_adapters",
    "running_jobs": "max_running_jobs_per_tenant",
    "requests_per_minute": "quota_requests_per_minute",
    "tokens_per_minute": "quota_tokens_per_minute",
}
WINDOW_S = 60
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_KEY_PREFIX = "prefixd:rate:"
UNAVAILABLE_RETRY_S = 2  # also how long a process stops asking an unreachable Redis


class QuotaExceeded(Exception):
    """Over one of a tenant's quotas (the message names it). A `rate` quota (per minute) clears by
    itself after `retry_after_s`; a stock quota (storage, files, adapters) only once something is
    deleted. The API answers 429 (app/api/errors.py)."""

    def __init__(self, quota: str, message: str, retry_after_s: int, *, rate: bool):
        super().__init__(message)
        self.quota, self.message, self.rate = quota, message, rate
        self.retry_after_s = max(1, int(retry_after_s))


class RateLimiterUnavailable(Exception):
    """The shared rate windows (Redis) cannot be reached. Refusing is the only answer that keeps the
    quota: admitting unmetered would let every replica serve unlimited. The API answers 503."""

    retry_after_s = UNAVAILABLE_RETRY_S

    def __init__(self):
        super().__init__(f"The rate limiter is unavailable (its store cannot be reached); retry after "
                         f"{UNAVAILABLE_RETRY_S} s")
        self.message = str(self)


def limit_of(tenant, settings, quota: str) -> int:
    """The tenant's effective limit (its override, else the setting); 0 = unlimited."""
    override = (getattr(tenant, "quotas", None) or {}).get(quota)
    value = override if override is not None else getattr(settings, QUOTA_SETTINGS[quota])
    return max(0, int(value or 0))


def effective_quotas(tenant, settings) -> dict[str, int]:
    return {q: limit_of(tenant, settings, q) for q in QUOTA_SETTINGS}


def _rejected(quota: str) -> None:
    try:
        metrics.rejected(f"quota_{quota}")
    except Exception:  # noqa: BLE001 - metrics never fail a request
        pass


# ----------------------------------------------------------------------------- stock quotas


def lock_tenant(session, tenant_id: str) -> None:
    """Serialise this tenant's stock-quota check + insert until `session` commits or rolls back.

    PostgreSQL (and other servers): `SELECT ... FOR UPDATE` on the tenant row; in READ COMMITTED
    each later count sees every insert committed before the lock was granted. SQLite: pysqlite
    opens its transaction at the first write, so a no-op UPDATE of the tenant row is what takes
    SQLite's write lock (waiting up to busy_timeout) before the counts are read; BEGIN IMMEDIATE
    would fail inside a transaction that has already written."""

    table = Tenant.__table__
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(table).where(table.c.id == tenant_id).values(name=table.c.name))
    else:
        session.execute(select(table.c.id).where(table.c.id == tenant_id).with_for_update())


def check_upload(session, tenant, settings, size: int, *, lock: bool = True) -> None:
    """Before a file row is inserted: one more file of `size` bytes must fit `files` and
    `storage_bytes`. With `lock` (the default) the tenant stays locked until the caller commits:
    insert the row in the same transaction. `lock=False` is only an early refusal."""

    max_files = limit_of(tenant, settings, "files")
    max_bytes = limit_of(tenant, settings, "storage_bytes")
    if not max_files and not max_bytes:
        return
    if lock:
        lock_tenant(session, tenant.id)
    files, stored = session.execute(
        select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant.id)
    ).one()
    files, stored = int(files), int(stored)
    if max_files and files + 1 > max_files:
        _rejected("files")
        raise QuotaExceeded("files", f"files quota of {max_files} exceeded: the tenant has {files} files; "
                                     "delete files or ask the administrator for a higher quota", 60, rate=False)
    if max_bytes and stored + size > max_bytes:
        _rejected("storage_bytes")
        raise QuotaExceeded("storage_bytes",
                            f"storage_bytes quota of {max_bytes} exceeded: {stored} bytes stored + {size} in this "
                            "file; delete files or ask the administrator for a higher quota", 60, rate=False)


def insert_with_blob(session, row, check, blobs, blob_key: str) -> None:
    """Insert `row`, whose blob is already stored at `blob_key`, after `check()` (a stock-quota
    check with the tenant locked) in the same transaction: of inserts racing for the last slot (on
    any replica) exactly one gets it. If the check refuses or the insert fails, the blob is deleted
    and the error raised: no blob without its row."""
    try:
        check()
        session.add(row)
        session.commit()
    except Exception:
        session.rollback()
        try:
            blobs.delete(blob_key)
        except Exception:  # noqa: BLE001 - the caller gets the original error; an orphan blob is harmless
            log.warning("could not delete blob %s after a refused insert", blob_key, exc_info=True)
        raise


def check_adapter_count(session, tenant, settings, *, lock: bool = True) -> None:
    """Before an adapter is imported, or a prefix job (which makes one) is created: the tenant's
    adapters plus its prefix jobs still to finish must stay within `adapters`. With `lock` (the
    default) insert the model or job row in the same transaction (see `check_upload`)."""

    limit = limit_of(tenant, settings, "adapters")
    if not limit:
        return
    if lock:
        lock_tenant(session, tenant.id)
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
    """Amounts per key over the last `window_s` seconds, in one-second buckets, in this process
    (thread-safe). The embedded mode's window: one API process, so nothing to share."""

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


# One script call = one atomic check-and-add (Redis runs a script with nothing interleaved), so
# concurrent requests on any number of replicas can never together pass the limit.
# KEYS[1]: one tenant's hash for one rate (field: epoch second, value: amount in that second).
# ARGV: amount, limit (0 = unlimited), window seconds, now in seconds ("" = the server's TIME).
# Returns {status, used, wait_ms}: status 0 admitted (used includes amount), 1 refused (wait_ms
# until it fits), 2 refused for good (amount > limit).
_LUA_TRY_ADD = """
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end
local now_s = math.floor(now)
local flat = redis.call('HGETALL', KEYS[1])
local used = 0
local secs = {}
local counts = {}
for i = 1, #flat, 2 do
  local sec = tonumber(flat[i])
  local c = tonumber(flat[i + 1])
  if sec <= now_s - window then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    used = used + c
    secs[#secs + 1] = sec
    counts[sec] = c
  end
end
if limit > 0 and amount > limit then
  return {2, used, 0}
end
if limit > 0 and used + amount > limit then
  table.sort(secs)
  local need = used + amount - limit
  local freed = 0
  for _, sec in ipairs(secs) do
    freed = freed + counts[sec]
    if freed >= need then
      return {1, used, math.ceil((sec + window - now) * 1000)}
    end
  end
  return {1, used, window * 1000}
end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%d', now_s), amount)
  redis.call('EXPIRE', KEYS[1], window + 1)
  used = used + amount
end
return {0, used, 0}
"""


class RedisSlidingWindow:
    """The same window as `SlidingWindow`, kept in Redis so every API replica shares it.

    Keys are `{key_prefix}{key}` (key = the tenant id, an id the service issued); each expires
    `window_s + 1` s after its last write, so an idle tenant costs nothing. `clock` (seconds) is
    for tests; by default the Redis server's clock is used, the one clock all replicas share.
    Any Redis error raises `RateLimiterUnavailable` (503); after one, this process answers 503
    for `UNAVAILABLE_RETRY_S` without asking again, so an unreachable Redis costs one connect
    timeout per interval, not one per request. The async routes call it in a worker thread
    (`check_request_rate_async`, `charge_tokens_async`), never on the event loop."""

    def __init__(self, client, key_prefix: str, window_s: int = WINDOW_S, clock=None):
        self.client = client
        self.key_prefix = key_prefix
        self.window_s = window_s
        self.clock = clock
        self._script = client.register_script(_LUA_TRY_ADD)
        self._down_until = 0.0

    def _run(self, key: str, amount: int, limit: int) -> tuple[int, int, int]:
        import redis

        if time.monotonic() < self._down_until:
            raise RateLimiterUnavailable()
        now = "" if self.clock is None else repr(float(self.clock()))
        try:
            status, used, wait_ms = self._script(keys=[self.key_prefix + key],
                                                 args=[int(amount), int(limit), self.window_s, now])
        except redis.RedisError as e:
            self._down_until = time.monotonic() + UNAVAILABLE_RETRY_S
            log.warning("rate limiter: Redis unavailable (%s: %s); refusing rated requests for %d s",
                        type(e).__name__, e, UNAVAILABLE_RETRY_S)
            raise RateLimiterUnavailable() from None
        return int(status), int(used), int(wait_ms)

    def used(self, key: str) -> int:
        return self._run(key, 0, 0)[1]

    def try_add(self, key: str, amount: int, limit: int) -> float | None:
        status, _, wait_ms = self._run(key, amount, limit)
        if status == 0:
            return None
        if status == 2:
            return math.inf
        return max(0.0, wait_ms / 1000)


class RateLimiter:
    """`requests_per_minute` and `tokens_per_minute` for every tenant: in this process by
    default, or over the given shared windows (`RateLimiter.redis`)."""

    def __init__(self, clock=time.monotonic, *, requests=None, tokens=None):
        self.requests = requests if requests is not None else SlidingWindow(clock=clock)
        self.tokens = tokens if tokens is not None else SlidingWindow(clock=clock)

    @classmethod
    def redis(cls, client, key_prefix: str = REDIS_KEY_PREFIX, clock=None) -> RateLimiter:
        return cls(requests=RedisSlidingWindow(client, key_prefix + "requests:", clock=clock),
                   tokens=RedisSlidingWindow(client, key_prefix + "tokens:", clock=clock))

    @property
    def shared(self) -> bool:
        return isinstance(self.requests, RedisSlidingWindow)

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


def uses_redis(settings) -> bool:
    """Whether rate windows go to Redis: a Redis broker URL means the distributed mode, where K
    API replicas must share one budget."""
    url = getattr(settings, "redis_url", None) or ""
    return url.startswith(REDIS_SCHEMES)


def make_rate_limiter(settings) -> RateLimiter:
    if not uses_redis(settings):
        return RateLimiter()
    import redis

    # short timeouts: the check holds up its request, and a local Redis answers in well under 1 ms
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                  health_check_interval=30)
    return RateLimiter.redis(client)


_limiter_lock = threading.Lock()


def limiter(app) -> RateLimiter:
    """The process's limiter, on `app.state` (created on first use)."""
    lim = getattr(app.state, "rate_limiter", None)
    if lim is None:
        with _limiter_lock:
            lim = getattr(app.state, "rate_limiter", None)
            if lim is None:
                lim = app.state.rate_limiter = make_rate_limiter(app.state.settings)
    return lim


def check_request_rate(request, tenant) -> None:
    """At the start of an inference route: one request against `requests_per_minute`."""
    limiter(request.app).check_request(tenant, request.app.state.settings)


def charge_tokens(request, tenant, tokens: int) -> None:
    """Once the prompt is tokenized: prompt + max_tokens x choices against `tokens_per_minute`."""
    limiter(request.app).charge_tokens(tenant, request.app.state.settings, tokens)


async def check_request_rate_async(request, tenant) -> None:
    """`check_request_rate` for async routes. With the windows in Redis the check is a network round
    trip (up to the socket timeout when Redis is down), so it runs in a worker thread: the event
    loop keeps streaming other requests' tokens meanwhile. The in-process window is a few
    microseconds under a lock and stays on the loop."""
    lim = limiter(request.app)
    if lim.shared:
        await asyncio.to_thread(lim.check_request, tenant, request.app.state.settings)
    else:
        lim.check_request(tenant, request.app.state.settings)


async def charge_tokens_async(request, tenant, tokens: int) -> None:
    """`charge_tokens` for async routes (see `check_request_rate_async`)."""
    lim = limiter(request.app)
    if lim.shared:
        await asyncio.to_thread(lim.charge_tokens, tenant, request.app.state.settings, tokens)
    else:
        lim.charge_tokens(tenant, request.app.state.settings, tokens)
