"""app/tenancy/stop_broadcast.py: the stop messages (encode, decode, apply) and their pub/sub over a real
Redis (127.0.0.1:6379; skipped when it is not reachable). Each test listens on a channel of its
own, so parallel runs never see each other's messages. The two-replica HTTP test is
tests/integration/test_revoke_replicas.py."""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from types import SimpleNamespace

import pytest
from starlette.datastructures import State

from app.api.deps import hash_key
from app.config import Settings
from app.tenancy import stop_broadcast as sb
from app.tenancy.stop_broadcast import recently_stopped

REDIS_URL = os.environ.get("PREFIXD_TEST_REDIS", "redis://127.0.0.1:6379") + "/0"
KEY_HASH = hash_key("sk-test-not-a-real-key")


class FakeEngine:
    def __init__(self):
        self.cancelled: list[tuple] = []

    def cancel_key(self, key, reason="the API key was revoked"):
        self.cancelled.append(("key", key, reason))
        return 1

    def cancel_tenant(self, tenant_id, reason="the tenant was suspended"):
        self.cancelled.append(("tenant", tenant_id, reason))
        return 2


def _app(engine=None):
    state = State()
    state.serving = engine
    state.stop_broadcast = None
    return SimpleNamespace(state=state)


@pytest.fixture(scope="module")
def redis_url():
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Redis not reachable: {e}")
    return REDIS_URL


def _channel() -> str:
    return f"prefixd:test-stops:{uuid.uuid4().hex}"


def _wait(cond, timeout: float = 20.0) -> bool:
    """Poll `cond` (the listener is a thread); the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ----------------------------------------------------------------------------- messages


def test_messages_round_trip_and_carry_no_key():
    for msg in ({"kind": "key", "key_hash": KEY_HASH},
                {"kind": "tenant", "tenant_id": "tenant-abc", "deleted": False},
                {"kind": "tenant", "tenant_id": "tenant-abc", "deleted": True},
                {"kind": "tenant_resumed", "tenant_id": "tenant-abc"},
                {"kind": "adapter_deleted", "model_id": "ft:default:tenant-abc:my-suffix:job-1"}):
        data = sb.encode(msg)
        assert sb.decode(data) == msg and sb.decode(data.decode()) == msg
        assert b"sk-" not in data
    # a missing `deleted` means a suspension
    assert sb.decode(b'{"kind":"tenant","tenant_id":"t1"}') == {"kind": "tenant", "tenant_id": "t1", "deleted": False}


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"null", b"\xff\xfe", b'{"kind":"nope","tenant_id":"t1"}',
    b'{"kind":"key","key_hash":"sk-a-raw-key"}',  # only a sha256 hex names a key
    json.dumps({"kind": "key", "key_hash": KEY_HASH.upper()}).encode(),
    b'{"kind":"key"}', b'{"kind":"tenant","tenant_id":"a/b"}', b'{"kind":"tenant","tenant_id":7}',
    b'{"kind":"tenant_resumed","tenant_id":""}',
    b'{"kind":"adapter_deleted"}', b'{"kind":"adapter_deleted","model_id":"ft:a/../b"}',
    b'{"kind":"adapter_deleted","tenant_id":"t1"}', b'{"kind":"adapter_deleted","model_id":["m"]}',
    json.dumps({"kind": "tenant", "tenant_id": "t1", "pad": "x" * 2000}).encode(),  # too long
    12,
])
def test_malformed_messages_are_ignored(data):
    assert sb.decode(data) is None


def test_encode_refuses_what_decode_would_ignore():
    with pytest.raises(ValueError):
        sb.encode({"kind": "key", "key_hash": "sk-raw"})


def test_apply_cancels_in_the_engine_and_remembers_for_the_route():
    engine = FakeEngine()
    app = _app(engine)
    stopped = recently_stopped(app)
    assert sb.apply(app, {"kind": "key", "key_hash": KEY_HASH}) == 1
    assert sb.apply(app, {"kind": "tenant", "tenant_id": "t1", "deleted": False}) == 2
    assert sb.apply(app, {"kind": "tenant", "tenant_id": "t2", "deleted": True}) == 2
    assert engine.cancelled == [("key", KEY_HASH, "the API key was revoked"),
                                ("tenant", "t1", "the tenant was suspended"),
                                ("tenant", "t2", "the tenant was deleted")]
    assert f"key:{KEY_HASH}" in stopped and "tenant:t1" in stopped and "tenant:t2" in stopped
    assert sb.apply(app, {"kind": "tenant_resumed", "tenant_id": "t1"}) == 0
    assert "tenant:t1" not in stopped and len(engine.cancelled) == 3
    # no engine in this process (SERVING_ENABLED=0), or a failing one: remembered, nothing raised
    app2 = _app(None)
    assert sb.apply(app2, {"kind": "key", "key_hash": KEY_HASH}) == 0
    assert f"key:{KEY_HASH}" in recently_stopped(app2)
    broken = SimpleNamespace(cancel_key=lambda *a: 1 / 0)
    assert sb.apply(_app(broken), {"kind": "key", "key_hash": KEY_HASH}) == 0


def test_embedded_mode_stops_locally_and_publishes_nothing():
    import asyncio

    app = _app(FakeEngine())
    app.state.settings = Settings(redis_url=None)
    asyncio.run(sb.start(app))
    assert app.state.stop_broadcast is None
    sb.key_revoked(app, KEY_HASH)
    assert app.state.serving.cancelled == [("key", KEY_HASH, "the API key was revoked")]
    asyncio.run(sb.shutdown(app))


def test_channel_is_per_redis_db():
    assert sb.channel_for("redis://127.0.0.1:6379/3") == "prefixd:stops:3"
    assert sb.channel_for("redis://127.0.0.1:6379") == "prefixd:stops:0"
    assert sb.channel_for("unix:///tmp/redis.sock?db=5") == "prefixd:stops:5"


# ----------------------------------------------------------------------------- over Redis


def _listening(redis_url: str, channel: str, apps: list) -> list:
    """One started, subscribed listener per "replica" app, applying messages to that app."""
    buses = [sb.StopBroadcast(redis_url, functools.partial(sb.apply, a), channel=channel).start()
             for a in apps]
    for a, bus in zip(apps, buses, strict=False):
        a.state.stop_broadcast = bus
    if not all(bus.subscribed.wait(20) for bus in buses):
        for bus in buses:
            bus.stop()
        raise AssertionError("a listener did not subscribe within 20 s")
    return buses


def test_every_listener_applies_what_any_replica_publishes(redis_url):
    """Two "replicas" on one channel: a stop published by one is applied by both (its own copy
    too: applying twice does nothing more), and a malformed message does not end the listener."""
    import redis

    channel = _channel()
    apps = [_app(FakeEngine()), _app(FakeEngine())]
    buses = _listening(redis_url, channel, apps)
    try:
        sb.key_revoked(apps[0], KEY_HASH)  # applied on app 0 at once, then published
        assert apps[0].state.serving.cancelled[0] == ("key", KEY_HASH, "the API key was revoked")
        raw = redis.Redis.from_url(redis_url)
        raw.publish(channel, b"garbage that is not a stop message")
        raw.close()
        sb.tenant_stopped(apps[1], "tenant-x", deleted=True)
        sb.tenant_stopped(apps[0], "tenant-y")
        sb.tenant_resumed(apps[1], "tenant-y")
        assert _wait(lambda: all(bus.received == 4 for bus in buses)), [bus.received for bus in buses]
        for a in apps:
            got = set(a.state.serving.cancelled)
            assert got == {("key", KEY_HASH, "the API key was revoked"),
                           ("tenant", "tenant-x", "the tenant was deleted"),
                           ("tenant", "tenant-y", "the tenant was suspended")}, got
            stopped = recently_stopped(a)
            assert f"key:{KEY_HASH}" in stopped and "tenant:tenant-x" in stopped
            assert "tenant:tenant-y" not in stopped  # the last word was the unsuspension
    finally:
        for bus in buses:
            bus.stop()
    assert not any(bus._thread.is_alive() for bus in buses)


def test_the_listener_reconnects_when_its_connection_drops(redis_url):
    import redis

    channel = _channel()
    got: list[dict] = []
    bus = sb.StopBroadcast(redis_url, got.append, channel=channel).start()
    admin = redis.Redis.from_url(redis_url)
    try:
        assert bus.subscribed.wait(20)
        ids = [c["id"] for c in admin.client_list() if c.get("name") == bus.name]
        assert len(ids) == 1
        admin.client_kill_filter(_id=ids[0])
        # resubscribed on a new connection: a later message arrives (published until one does,
        # since the first may be sent before the new subscription)
        msg = {"kind": "tenant", "tenant_id": "after-drop", "deleted": False}
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            bus.publish(msg)
            time.sleep(0.1)
        assert got and got[0] == msg
        assert [c["id"] for c in admin.client_list() if c.get("name") == bus.name] != ids
    finally:
        bus.stop()
        admin.close()
    assert not bus._thread.is_alive()


def test_the_listener_pings_its_connection(redis_url, monkeypatch):
    """The listener's watchdog: it PINGs every PING_INTERVAL_S and counts the answers (a silent
    connection, no answer in 3 intervals, is dropped and reopened)."""
    monkeypatch.setattr(sb, "PING_INTERVAL_S", 0.05)
    bus = sb.StopBroadcast(redis_url, lambda msg: None, channel=_channel(), poll_s=0.05).start()
    try:
        assert bus.subscribed.wait(20)
        assert _wait(lambda: bus.pongs >= 3), bus.pongs
    finally:
        bus.stop()


def test_unreachable_redis_neither_raises_nor_blocks_shutdown():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got: list = []
    bus = sb.StopBroadcast(f"redis://127.0.0.1:{port}/0", got.append, channel=_channel()).start()
    try:
        app = _app(FakeEngine())
        app.state.stop_broadcast = bus
        sb.key_revoked(app, KEY_HASH)  # the local part is done; the publish failure is only logged
        assert app.state.serving.cancelled and f"key:{KEY_HASH}" in recently_stopped(app)
        assert bus.publish({"kind": "key", "key_hash": KEY_HASH}) is False
        time.sleep(0.5)  # let the listener fail to connect and back off at least once
        assert bus._thread.is_alive() and not bus.subscribed.is_set()
    finally:
        bus.stop()
    assert not bus._thread.is_alive() and got == []


# ----------------------------------------------------------------------------- adapter eviction


class _Adapter:
    num_virtual_tokens = 2

    def key_values(self, dtype=None, device=None):
        return "kv"


def _serving_engine():
    """A real ServingEngine (its adapter cache, prefix_for, evict, evict_tenant), not started, on a
    stand-in base; adapters load from a stand-in loader."""
    from app.serving.engine import ServingEngine

    engine = ServingEngine(Settings(adapter_cache_size=8), adapter_loader=lambda key: _Adapter(),
                           check_compatible=lambda adapter, base: None)
    engine.set_base("default", SimpleNamespace(fingerprint="fp", model=None, device="cpu"))
    return engine


# two tenants' adapters, ids as app.jobs.service.fine_tuned_model_id makes them
T1, T2 = "tenant-one", "tenant-two"
ADAPTERS = {f"ft:default:{T1}:a:job-1": T1, f"ft:default:{T1}:b:job-2": T1,
            f"ft:default:{T2}:a:job-3": T2, f"ft:default:{T2}:b:job-4": T2}


def _load_adapters(engine):
    for model_id, tenant_id in ADAPTERS.items():
        engine.prefix_for(model_id, f"adapters/{tenant_id}/{model_id}", tenant_id=tenant_id)
    assert sorted(engine.cache.keys()) == sorted(ADAPTERS)


def test_apply_evicts_a_deleted_tenants_adapters_and_a_deleted_adapter():
    engine = _serving_engine()
    _load_adapters(engine)
    app = _app(engine)
    assert sb.apply(app, {"kind": "tenant", "tenant_id": T1, "deleted": False}) == 0
    assert len(engine.cache) == 4  # a suspension keeps the adapters: the tenant may come back
    assert sb.apply(app, {"kind": "tenant", "tenant_id": T1, "deleted": True}) == 0  # no rows in flight
    assert sorted(engine.cache.keys()) == [f"ft:default:{T2}:a:job-3", f"ft:default:{T2}:b:job-4"]
    assert sb.apply(app, {"kind": "adapter_deleted", "model_id": f"ft:default:{T2}:a:job-3"}) == 0
    assert engine.cache.keys() == [f"ft:default:{T2}:b:job-4"]
    # twice does nothing more; no engine, or a failing one: nothing raised
    assert sb.apply(app, {"kind": "tenant", "tenant_id": T1, "deleted": True}) == 0
    assert sb.apply(app, {"kind": "adapter_deleted", "model_id": f"ft:default:{T2}:a:job-3"}) == 0
    assert engine.cache.keys() == [f"ft:default:{T2}:b:job-4"]
    assert sb.apply(_app(None), {"kind": "adapter_deleted", "model_id": "m"}) == 0
    assert sb.apply(_app(SimpleNamespace(evict=lambda *a: 1 / 0)), {"kind": "adapter_deleted", "model_id": "m"}) == 0
    assert "tenant:" + T2 not in recently_stopped(app)  # an adapter's deletion stops no request


def test_every_replica_evicts_a_deleted_tenants_and_a_deleted_adapters_entries(redis_url):
    """Two "replicas", each with its own engine holding both tenants' adapters: the tenant deleted
    through replica 0 and the adapter deleted through replica 1 leave both caches with the one
    adapter left."""
    channel = _channel()
    apps = [_app(_serving_engine()), _app(_serving_engine())]
    for a in apps:
        _load_adapters(a.state.serving)
    buses = _listening(redis_url, channel, apps)
    try:
        sb.tenant_stopped(apps[0], T1, deleted=True)
        assert len(apps[0].state.serving.cache) == 2  # the receiving replica evicts at once
        sb.adapter_deleted(apps[1], f"ft:default:{T2}:a:job-3")
        assert _wait(lambda: all(bus.received == 2 for bus in buses)), [bus.received for bus in buses]
        for a in apps:
            assert a.state.serving.cache.keys() == [f"ft:default:{T2}:b:job-4"]
            assert f"tenant:{T1}" in recently_stopped(a)
    finally:
        for bus in buses:
            bus.stop()


# ----------------------------------------------------------------------------- reconciliation


def _db(tmp_path):
    """A real SQLite database (migrated) with its session factory."""
    from app.store.db import init_db, make_engine, make_session_factory

    engine = make_engine(f"sqlite:///{tmp_path}/stops.db")
    init_db(engine)
    return engine, make_session_factory(engine)


def _tenant(sf, tenant_id: str, n_keys: int) -> list[str]:
    """A tenant with `n_keys` live keys; returns the keys' hashes (as the engine's rows carry them)."""
    from app.api.deps import new_api_key
    from app.store.tables import ApiKey, Tenant

    hashes = [hash_key(new_api_key()) for _ in range(n_keys)]
    with sf() as s:
        s.add(Tenant(id=tenant_id, name=tenant_id))
        s.flush()
        s.add_all(ApiKey(tenant_id=tenant_id, key_hash=h) for h in hashes)
        s.commit()
    return hashes


def _hold(engine, rows: list[tuple]) -> list:
    """Queue WorkItems (tenant id, key hash) in a real, unstarted ServingEngine: rows it holds."""
    from app.serving.scheduler import WorkItem

    items = [WorkItem(t, kind="generate", key=k) for t, k in rows]
    engine.scheduler.submit(items)
    return items


def test_reconcile_cancels_what_the_database_says_was_stopped(tmp_path):
    """`reconcile` on a real engine and a real database: a revoked key, a suspended and a deleted
    tenant get the live messages' reasons; a live key of the same tenant, a key-less row and
    another tenant's rows keep running. Nothing held: no query at all."""
    from datetime import datetime

    from sqlalchemy import delete, update

    from app.store.tables import ApiKey, Tenant

    db, sf = _db(tmp_path)
    try:
        k_revoked, k_live = _tenant(sf, "t-keys", 2)
        (k_other,) = _tenant(sf, "t-other", 1)
        (k_susp,) = _tenant(sf, "t-susp", 1)
        (k_gone,) = _tenant(sf, "t-gone", 1)
        engine = _serving_engine()
        app = _app(engine)
        calls = []
        counting = lambda: calls.append(1) or sf()  # noqa: E731
        assert sb.reconcile(app, counting) == 0 and calls == []  # nothing held: no session
        items = _hold(engine, [("t-keys", k_revoked), ("t-keys", k_revoked), ("t-keys", k_live),
                               ("t-keys", None), ("t-other", k_other), ("t-susp", k_susp), ("t-gone", k_gone)])
        assert sb.reconcile(app, counting) == 0 and len(calls) == 1  # all live: nothing cancelled
        assert not any(i.cancelled for i in items)
        with sf() as s:
            now = int(datetime.now().timestamp())
            s.execute(update(ApiKey).where(ApiKey.key_hash == k_revoked).values(revoked_at=now))
            s.execute(update(Tenant).where(Tenant.id == "t-susp").values(suspended=True))
            s.execute(delete(ApiKey).where(ApiKey.tenant_id == "t-gone"))
            s.execute(delete(Tenant).where(Tenant.id == "t-gone"))
            s.commit()
        assert sb.reconcile(app, sf) == 4
        assert [i.cancel_reason for i in items] == [
            "the API key was revoked",
            "the API key was revoked",
            None,
            None,
            None,
            "the tenant was suspended",
            "the tenant was deleted",
        ]
        stopped = recently_stopped(app)
        assert f"key:{k_revoked}" in stopped and "tenant:t-susp" in stopped and "tenant:t-gone" in stopped
        assert f"key:{k_live}" not in stopped and "tenant:t-keys" not in stopped
        assert engine.inflight_credentials() == {("t-keys", k_live), ("t-keys", None), ("t-other", k_other)}
        assert sb.reconcile(app, sf) == 0  # again: nothing more
        assert sb.reconcile(_app(None), sf) == 0  # no engine in this process
    finally:
        db.dispose()


def test_a_key_revoked_while_the_listener_was_cut_off_is_reconciled(redis_url, tmp_path):
    """The listener's connection is killed and held down (a gate on reconnecting) while a key is
    revoked in the database with no message published: once it resubscribes, the key's rows are
    cancelled, another key's rows are not."""
    import threading

    import redis
    from sqlalchemy import update

    from app.store.tables import ApiKey

    db, sf = _db(tmp_path)
    admin = redis.Redis.from_url(redis_url)
    engine = _serving_engine()
    app = _app(engine)
    k_revoked, k_kept = _tenant(sf, "t-one", 2)
    (k_other,) = _tenant(sf, "t-two", 1)
    items = _hold(engine, [("t-one", k_revoked), ("t-one", k_kept), ("t-two", k_other), ("t-one", k_revoked)])
    bus = sb.StopBroadcast(
        redis_url, lambda msg: sb.apply(app, msg), channel=_channel(), on_subscribed=lambda: sb.reconcile(app, sf)
    )
    gate = threading.Event()
    listen = bus._listen

    def gated_listen():  # the reconnection waits for the end of the "outage"
        if bus.subscriptions:
            gate.wait(60)
        return listen()

    bus._listen = gated_listen
    bus.start()
    try:
        assert bus.subscribed.wait(20) and bus.reconciled == 1
        assert not any(i.cancelled for i in items)
        ids = [c["id"] for c in admin.client_list() if c.get("name") == bus.name]
        assert len(ids) == 1
        admin.client_kill_filter(_id=ids[0])
        assert _wait(lambda: not bus.subscribed.is_set()), "the listener did not notice the kill"
        with sf() as s:  # revoked during the outage; nobody publishes (or the message is lost)
            s.execute(update(ApiKey).where(ApiKey.key_hash == k_revoked).values(revoked_at=1))
            s.commit()
        assert not any(i.cancelled for i in items)
        gate.set()
        assert _wait(lambda: bus.subscribed.is_set() and bus.reconciled == 2), (bus.subscriptions, bus.reconciled)
        assert [i.cancel_reason for i in items] == ["the API key was revoked", None, None, "the API key was revoked"]
        assert f"key:{k_revoked}" in recently_stopped(app)
    finally:
        gate.set()
        bus.stop()
        admin.close()
        db.dispose()
    assert not bus._thread.is_alive()


def test_a_failing_reconciliation_does_not_end_the_listener(redis_url):
    def broken():
        raise RuntimeError("database down")

    got: list[dict] = []
    bus = sb.StopBroadcast(redis_url, got.append, channel=_channel(), on_subscribed=broken).start()
    try:
        assert bus.subscribed.wait(20) and bus.reconciled == 1
        msg = {"kind": "key", "key_hash": KEY_HASH}
        assert bus.publish(msg)
        assert _wait(lambda: got == [msg]), got
        assert bus._thread.is_alive()
    finally:
        bus.stop()


def test_start_wires_the_reconciliation_to_the_apps_session_factory(redis_url, tmp_path):
    import asyncio

    db, sf = _db(tmp_path)
    engine = _serving_engine()
    app = _app(engine)
    app.state.settings = Settings(redis_url=redis_url)
    app.state.session_factory = sf
    (k,) = _tenant(sf, "t-wired", 1)
    with sf() as s:  # revoked before this replica ever subscribed
        from sqlalchemy import update

        from app.store.tables import ApiKey

        s.execute(update(ApiKey).where(ApiKey.key_hash == k).values(revoked_at=1))
        s.commit()
    (item,) = _hold(engine, [("t-wired", k)])
    asyncio.run(sb.start(app))
    bus = app.state.stop_broadcast
    try:
        assert bus is not None and bus.subscribed.wait(20) and bus.reconciled == 1
        assert item.cancel_reason == "the API key was revoked"
    finally:
        asyncio.run(sb.shutdown(app))
        db.dispose()
