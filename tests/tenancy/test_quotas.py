"""Unit tests of app/tenancy/quotas.py (no service): the in-process and Redis sliding-window limiters
(two replicas sharing one budget, threads never over-admitting, an unreachable Redis answering 503),
effective quotas, and stock-quota checks that hold under racing inserts (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from fastapi import Request

from app.api.errors import quota_error
from app.config import Settings
from app.tenancy.quotas import QuotaExceeded, RateLimiter, RedisSlidingWindow, SlidingWindow, effective_quotas, limit_of


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
    with pytest.raises(QuotaExceeded) as e:
        lim.check_request(t, s)
    assert e.value.quota == "requests_per_minute" and e.value.rate
    err = quota_error(e.value)  # the API's answer to it
    assert err.status_code == 429 and err.type == "rate_limit_error"
    assert err.code == "requests_per_minute_quota_exceeded"
    assert "requests_per_minute quota of 2 exceeded" in err.message
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    lim.charge_tokens(t, s, 80)
    with pytest.raises(QuotaExceeded) as e:
        lim.charge_tokens(t, s, 30)
    assert "tokens_per_minute quota of 100 exceeded" in e.value.message
    with pytest.raises(QuotaExceeded) as e:
        lim.charge_tokens(t, s, 101)
    assert "alone needs 101 tokens" in e.value.message and quota_error(e.value).headers["Retry-After"] == "60"
    assert lim.usage("t1") == {"requests_per_minute": 2, "tokens_per_minute": 80}
    clock.t += 61
    lim.check_request(t, s)
    lim.charge_tokens(t, s, 100)


# ----------------------------------------------------------------------------- rates in Redis
# Against the real Redis (PREFIXD_TEST_REDIS, db 0, which the integration harness never claims);
# every test uses its own key prefix and deletes its keys.

REDIS_URL = os.environ.get("PREFIXD_TEST_REDIS", "redis://127.0.0.1:6379") + "/0"


@pytest.fixture
def redis_prefix():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis not reachable: {e}")
    prefix = f"prefixd-test:{uuid.uuid4().hex}:"
    yield prefix
    for key in client.scan_iter(prefix + "*"):
        client.delete(key)
    client.close()


def _replica(prefix: str, clock=None) -> RateLimiter:
    """What one API replica builds: its own client (and connection pool) on the shared Redis."""
    import redis

    return RateLimiter.redis(redis.Redis.from_url(REDIS_URL, socket_timeout=3), key_prefix=prefix, clock=clock)


def test_redis_window_says_when_like_the_in_process_one(redis_prefix):
    import redis

    clock = Clock(float(int(time.time())))
    t0 = clock.t
    w = RedisSlidingWindow(redis.Redis.from_url(REDIS_URL), redis_prefix, 60, clock=clock)
    for _ in range(3):
        assert w.try_add("a", 1, 3) is None
        clock.t += 10
    assert w.try_add("a", 1, 3) == pytest.approx(30, abs=0.01)
    assert w.used("a") == 3
    clock.t = t0 + 59.5
    assert w.try_add("a", 1, 3) == pytest.approx(0.5, abs=0.01)
    clock.t = t0 + 60
    assert w.try_add("a", 1, 3) is None  # the first bucket left the window
    assert w.used("a") == 3 and w.used("b") == 0
    assert math.isinf(w.try_add("b", 4, 3)) and w.used("b") == 0  # a refusal records nothing
    for _ in range(100):
        assert w.try_add("c", 7, 0) is None  # 0 = unlimited
    assert w.used("c") == 700


def test_two_replicas_share_one_budget(redis_prefix):
    a, b = _replica(redis_prefix), _replica(redis_prefix)
    s = Settings(quota_requests_per_minute=4, quota_tokens_per_minute=100)
    t = _tenant()
    for lim in (a, b, a, b):
        lim.check_request(t, s)
    for lim in (a, b):  # K replicas no longer allow K x the quota
        with pytest.raises(QuotaExceeded) as e:
            lim.check_request(t, s)
        err = quota_error(e.value)
        assert err.status_code == 429 and err.code == "requests_per_minute_quota_exceeded"
        assert "requests_per_minute quota of 4 exceeded" in e.value.message
        assert 1 <= int(err.headers["Retry-After"]) <= 60
    a.charge_tokens(t, s, 60)
    with pytest.raises(QuotaExceeded) as e:
        b.charge_tokens(t, s, 41)
    assert "tokens_per_minute quota of 100 exceeded" in e.value.message
    b.charge_tokens(t, s, 40)
    assert a.usage("t1") == b.usage("t1") == {"requests_per_minute": 4, "tokens_per_minute": 100}
    # another tenant has its own budget
    b.check_request(SimpleNamespace(id="t2", quotas={}), s)


def test_redis_limiter_never_over_admits_under_concurrency(redis_prefix):
    replicas = [_replica(redis_prefix) for _ in range(3)]
    s = Settings(quota_requests_per_minute=37)
    t = _tenant()
    admitted, refused = [], []
    start = threading.Barrier(12)

    def hammer(lim):
        start.wait()
        for _ in range(20):
            try:
                lim.check_request(t, s)
                admitted.append(1)
            except QuotaExceeded as e:
                assert quota_error(e).status_code == 429
                refused.append(1)

    threads = [threading.Thread(target=hammer, args=(replicas[i % 3],)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(admitted) == 37 and len(refused) == 12 * 20 - 37
    assert replicas[0].usage("t1")["requests_per_minute"] == 37


def test_unreachable_redis_is_a_503_envelope_with_retry_after():
    """Fail closed: never admitted unmetered, never a 500 with a traceback."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.api.errors import install_error_handlers
    from app.tenancy.quotas import check_request_rate, limiter

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = FastAPI()
    install_error_handlers(app)
    app.state.settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0")

    @app.post("/rated")
    async def rated(request: Request):  # Request is imported at module level: annotations are strings
        check_request_rate(request, _tenant())
        return {"ok": True}

    c = TestClient(app, raise_server_exceptions=False)
    for _ in range(2):  # the second one is answered without asking Redis again
        r = c.post("/rated")
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "rate_limiter_unavailable" and "rate limiter" in err["message"]
        assert str(port) not in err["message"]  # the Redis URL (maybe with a password) never leaks
        assert 1 <= int(r.headers["retry-after"]) <= 60
    assert limiter(app).shared


def test_shared_rate_checks_run_off_the_event_loop():
    """With the windows in Redis (a network round trip) the async routes' checks run in a worker
    thread; the in-process window stays on the loop."""
    import asyncio

    from starlette.datastructures import State

    from app.tenancy.quotas import charge_tokens_async, check_request_rate_async

    class Probe(RateLimiter):
        def __init__(self, shared: bool):
            super().__init__()
            self._shared, self.threads = shared, []

        @property
        def shared(self) -> bool:
            return self._shared

        def check_request(self, tenant, settings):
            self.threads.append(threading.current_thread())
            super().check_request(tenant, settings)

        def charge_tokens(self, tenant, settings, tokens):
            self.threads.append(threading.current_thread())
            super().charge_tokens(tenant, settings, tokens)

    for shared in (True, False):
        lim = Probe(shared)
        request = SimpleNamespace(app=SimpleNamespace(state=State({"settings": Settings(), "rate_limiter": lim})))

        async def route(request=request):
            await check_request_rate_async(request, _tenant())
            await charge_tokens_async(request, _tenant(), 10)
            return threading.current_thread()

        loop_thread = asyncio.run(route())
        assert len(lim.threads) == 2
        assert all((t is not loop_thread) == shared for t in lim.threads), (shared, lim.threads)
        assert lim.usage("t1") == {"requests_per_minute": 1, "tokens_per_minute": 10}


def test_embedded_settings_keep_the_in_process_limiter():
    from app.tenancy.quotas import make_rate_limiter

    assert not make_rate_limiter(Settings()).shared
    assert make_rate_limiter(Settings(redis_url=REDIS_URL)).shared


# ----------------------------------------------------------------------------- stock quotas under races


def _pg_url():
    psycopg = pytest.importorskip("psycopg")
    dsn = os.environ.get("PREFIXD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=3)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable: {e}")
    name = f"prefixd_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return admin, name, dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    from app.store.db import init_db, make_engine, make_session_factory

    admin = name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/q.db"
    else:
        admin, name, url = _pg_url()
    engine = make_engine(url)
    init_db(engine)
    yield make_session_factory(engine)
    engine.dispose()
    if admin is not None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_racing_uploads_never_pass_the_files_quota(db):
    """The check and the insert in one transaction with the tenant locked: of 8 racing uploads with
    3 slots left, exactly 3 get in (the pause between check and insert widens the race)."""
    from app.store.tables import File, Tenant, new_id
    from app.tenancy.quotas import QuotaExceeded, check_upload

    with db() as s:
        tenant = Tenant(name="t", quotas={"files": 4})
        s.add(tenant)
        s.flush()
        s.add(File(id=new_id("file"), tenant_id=tenant.id, filename="f", purpose="fine-tune", bytes=1,
                   status="processed", blob_key="k"))
        s.commit()
    settings = Settings()
    start = threading.Barrier(8)
    out: list[str] = []

    def upload():
        with db() as s:
            t = s.get(Tenant, tenant.id)
            s.commit()
            start.wait()
            try:
                check_upload(s, t, settings, 10)
                time.sleep(0.05)
                fid = new_id("file")
                s.add(File(id=fid, tenant_id=t.id, filename="f", purpose="fine-tune", bytes=10,
                           status="uploaded", blob_key=f"files/{t.id}/{fid}"))
                s.commit()
                out.append("ok")
            except QuotaExceeded as e:
                assert e.quota == "files"
                out.append("429")

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(out) == ["429"] * 5 + ["ok"] * 3
    with db() as s:
        from sqlalchemy import func, select

        assert s.scalar(select(func.count(File.id)).where(File.tenant_id == tenant.id)) == 4
