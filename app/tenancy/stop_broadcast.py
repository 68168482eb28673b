"""Cancellation of in-flight requests on every API replica (key revocation, tenant suspension or
deletion) and eviction of deleted adapters from every replica's cache, over Redis pub/sub.

Why it is shaped so (local apply, then publish; ids, never raw keys; the auth-to-submit window) is in
docs/design/STOP_BROADCAST.md.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

from app.store.ids import is_valid_id
from app.store.tables import ApiKey, Tenant
from app.tenancy.quotas import uses_redis

log = logging.getLogger("prefixd.stops")

CHANNEL_PREFIX = "prefixd:stops:"
MAX_MESSAGE_BYTES = 1024
KINDS = ("key", "tenant", "tenant_resumed", "adapter_deleted")
_KEY_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
PING_INTERVAL_S = 5.0  # the listener pings its connection; no answer in 3 intervals: reconnect
BACKOFF_S = (0.2, 30.0)  # first and largest wait between reconnection attempts


# ----------------------------------------------------------------------------- messages


def encode(msg: dict) -> bytes:
    if decode_obj(msg) is None:
        raise ValueError(f"not a stop message: kind {msg.get('kind')!r}")
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()


def decode(data) -> dict | None:
    """The message in `data` (bytes or str), or None if it is not a valid stop message."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return decode_obj(obj)


def decode_obj(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    if kind == "key":
        h = obj.get("key_hash")
        return {"kind": kind, "key_hash": h} if isinstance(h, str) and _KEY_HASH_RE.match(h) else None
    if kind in ("tenant", "tenant_resumed"):
        tid = obj.get("tenant_id")
        if not is_valid_id(tid):
            return None
        if kind == "tenant_resumed":
            return {"kind": kind, "tenant_id": tid}
        return {"kind": kind, "tenant_id": tid, "deleted": obj.get("deleted") is True}
    if kind == "adapter_deleted":
        mid = obj.get("model_id")
        return {"kind": kind, "model_id": mid} if is_valid_id(mid) else None
    return None


# ----------------------------------------------------------------------------- applying


class RecentlyStopped:
    """Key hashes revoked and tenants suspended or deleted in the last `ttl_s` seconds, in this
    process. A request authenticated just before its key was revoked can reach the engine just
    after the engine cancelled that key's rows; the inference routes check this after submitting
    and cancel their own rows, so no request that was in flight at the revocation completes. The
    window between auth and submit is seconds at most, hence the short memory."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._at = {k: t for k, t in self._at.items() if now - t < self.ttl_s}
            self._at[name] = now

    def discard(self, name: str) -> None:
        with self._lock:
            self._at.pop(name, None)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            t = self._at.get(name)
        return t is not None and time.monotonic() - t < self.ttl_s


_stopped_lock = threading.Lock()


def recently_stopped(app) -> RecentlyStopped:
    """The process's `RecentlyStopped`, on `app.state` (created on first use)."""
    rs = getattr(app.state, "recently_stopped", None)
    if rs is None:
        with _stopped_lock:
            rs = getattr(app.state, "recently_stopped", None)
            if rs is None:
                rs = app.state.recently_stopped = RecentlyStopped()
    return rs




def apply(app, msg: dict) -> int:
    """Apply a (decoded) stop message in this process; returns how many rows the engine cancelled."""
    kind = msg["kind"]
    if kind == "adapter_deleted":
        _serving_call(app, "evict", msg["model_id"])
        return 0
    stopped = recently_stopped(app)
    if kind == "tenant_resumed":
        stopped.discard(f"tenant:{msg['tenant_id']}")
        return 0
    if kind == "key":
        stopped.add(f"key:{msg['key_hash']}")
        return _serving_call(app, "cancel_key", msg["key_hash"])
    stopped.add(f"tenant:{msg['tenant_id']}")
    if msg.get("deleted"):
        cancelled = _serving_call(app, "cancel_tenant", msg["tenant_id"], "the tenant was deleted")
        _serving_call(app, "evict_tenant", msg["tenant_id"])  # its adapters' key/values
        return cancelled
    return _serving_call(app, "cancel_tenant", msg["tenant_id"])


def _serving_call(app, method: str, *args) -> int:
    fn = getattr(getattr(app.state, "serving", None), method, None)
    if not callable(fn):  # no engine in this process (SERVING_ENABLED=0)
        return 0
    try:
        return int(fn(*args) or 0)
    except Exception:  # noqa: BLE001 - the database change stands; serving is best effort
        log.warning("serving engine %s failed", method, exc_info=True)
        return 0


RECONCILE_CHUNK = 500  # ids per IN (...) query


def reconcile(app, session_factory) -> int:
    """Apply the stops this replica may have missed to the rows its engine holds now (see the
    module docstring); returns how many rows were cancelled. Raises on a database failure (the
    listener logs it)."""
    from sqlalchemy import select


    fn = getattr(getattr(app.state, "serving", None), "inflight_credentials", None)
    if not callable(fn):  # no engine in this process (SERVING_ENABLED=0)
        return 0
    held = set(fn())
    if not held:
        return 0
    tenant_ids = sorted({t for t, _ in held})
    keys_of: dict[str, set[str]] = {}
    for t, k in held:
        if k is not None:
            keys_of.setdefault(t, set()).add(k)
    suspended: dict[str, bool] = {}
    live_keys: set[tuple[str, str]] = set()
    session = session_factory()
    try:
        for i in range(0, len(tenant_ids), RECONCILE_CHUNK):
            chunk = tenant_ids[i:i + RECONCILE_CHUNK]
            suspended.update(session.execute(select(Tenant.id, Tenant.suspended).where(Tenant.id.in_(chunk))).all())
        for t in tenant_ids:  # each tenant's own keys: a key of another tenant is not this one's
            if suspended.get(t) is not False or t not in keys_of:
                continue
            ks = sorted(keys_of[t])
            for i in range(0, len(ks), RECONCILE_CHUNK):
                live_keys.update((t, h) for h in session.scalars(
                    select(ApiKey.key_hash).where(ApiKey.tenant_id == t, ApiKey.key_hash.in_(ks[i:i + RECONCILE_CHUNK]),
                                                  ApiKey.revoked_at.is_(None))))
    finally:
        try:
            session.rollback()
        finally:
            session.close()
    msgs: list[dict] = []
    for t in tenant_ids:
        if t not in suspended:
            msgs.append({"kind": "tenant", "tenant_id": t, "deleted": True})
        elif suspended[t]:
            msgs.append({"kind": "tenant", "tenant_id": t, "deleted": False})
        else:
            msgs.extend({"kind": "key", "key_hash": k} for k in sorted(keys_of.get(t, ())) if (t, k) not in live_keys)
    cancelled = 0
    stops = 0
    for msg in msgs:
        msg = decode_obj(msg)  # as a message from the channel would be
        if msg is not None:
            stops += 1
            cancelled += apply(app, msg)
    if stops:  # counts only: never a key, nor its hash
        log.warning("stop broadcast: reconciliation applied %d missed stop(s), cancelling %d row(s)", stops, cancelled)
    return cancelled


def stop(app, msg: dict) -> None:
    """Apply `msg` here, now, then tell the other replicas (when there is Redis)."""
    apply(app, msg)
    bus = getattr(app.state, "stop_broadcast", None)
    if bus is not None:
        bus.publish(msg)


def key_revoked(app, key_hash: str) -> None:
    stop(app, {"kind": "key", "key_hash": key_hash})


def tenant_stopped(app, tenant_id: str, *, deleted: bool = False) -> None:
    stop(app, {"kind": "tenant", "tenant_id": tenant_id, "deleted": deleted})


def tenant_resumed(app, tenant_id: str) -> None:
    stop(app, {"kind": "tenant_resumed", "tenant_id": tenant_id})


def adapter_deleted(app, model_id: str) -> None:
    stop(app, {"kind": "adapter_deleted", "model_id": model_id})


# ----------------------------------------------------------------------------- Redis


def channel_for(redis_url: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_url)  # parses only; no connection
    try:
        return f"{CHANNEL_PREFIX}{int(client.connection_pool.connection_kwargs.get('db') or 0)}"
    finally:
        client.close()


class StopBroadcast:
    """Publishes stop messages and, in a daemon thread, hands every valid message on `channel` to
    `on_message(msg)`. `start()` returns at once (the thread connects, and reconnects with
    backoff); `stop()` ends the thread within about `poll_s`. `on_subscribed()`, if given, runs in
    the listener thread each time the server confirms a subscription (the first and every
    resubscription), before the messages that follow: the replica's reconciliation."""

    def __init__(self, redis_url: str, on_message, channel: str | None = None, poll_s: float = 0.25,
                 on_subscribed=None):
        import redis

        self.channel = channel or channel_for(redis_url)
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.poll_s = poll_s
        self.name = f"prefixd-stops-{uuid.uuid4().hex[:8]}"  # the listener's CLIENT SETNAME
        self._url = redis_url
        # publishing runs in an admin request: short timeouts, and a failure is logged, not raised
        self._pub = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()  # set while the listener is subscribed (for tests)
        self.received = 0  # valid messages handed on
        self.pongs = 0  # answers to the listener's PINGs
        self.subscriptions = 0  # subscriptions confirmed (1 + reconnections)
        self.reconciled = 0  # `on_subscribed` calls ended, failed ones too (for tests)

    def publish(self, msg: dict) -> bool:
        try:
            self._pub.publish(self.channel, encode(msg))
            return True
        except Exception as e:  # noqa: BLE001 - the local cancellation is done; others' requests finish
            log.warning("could not broadcast a %s stop to the other replicas (%s)", msg.get("kind"),
                        type(e).__name__)
            return False

    def start(self) -> StopBroadcast:
        self._thread = threading.Thread(target=self._run, name="prefixd-stop-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self._pub.close()
        except Exception:  # noqa: BLE001
            pass

    def _run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = BACKOFF_S[0]
            except Exception as e:  # noqa: BLE001 - Redis gone, or anything else: retry, never die
                self.subscribed.clear()
                if self._stop.is_set():
                    break
                log.warning("stop broadcast: listener lost Redis (%s); reconnecting in %.1f s",
                            type(e).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])

    def _listen(self) -> None:
        import redis

        client = redis.Redis.from_url(self._url, socket_timeout=5.0, socket_connect_timeout=2.0,
                                      socket_keepalive=True, client_name=self.name)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            last_pong = last_ping = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_ping >= PING_INTERVAL_S:
                    pubsub.ping()
                    last_ping = now
                if now - last_pong > 3 * PING_INTERVAL_S:
                    raise redis.ConnectionError("no answer to PING")
                item = pubsub.get_message(timeout=self.poll_s)
                if item is None:
                    continue
                last_pong = time.monotonic()  # anything from the server: the connection works
                if item.get("type") == "subscribe":  # the server has confirmed the subscription
                    self.subscriptions += 1
                    self._subscribed()
                    last_pong = last_ping = time.monotonic()  # however long reconciling took
                    self.subscribed.set()
                elif item.get("type") == "pong":
                    self.pongs += 1
                elif item.get("type") == "message":
                    self._handle(item.get("data"))
        finally:
            self.subscribed.clear()
            try:
                pubsub.close()
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def _subscribed(self) -> None:
        if self.on_subscribed is None:
            return
        try:
            self.on_subscribed()
        except Exception as e:  # noqa: BLE001 - e.g. the database is down: the live messages still count
            # the type only: a database error's text carries its statement's parameters (key hashes)
            log.warning("stop broadcast: reconciliation after subscribing failed (%s)", type(e).__name__)
            log.debug("stop broadcast: reconciliation failure", exc_info=True)
        finally:
            self.reconciled += 1

    def _handle(self, data) -> None:
        msg = decode(data)
        if msg is None:
            size = len(data) if isinstance(data, (bytes, str)) else 0
            log.warning("stop broadcast: ignored a malformed message (%d bytes)", size)
            return
        self.received += 1
        try:
            self.on_message(msg)
        except Exception:  # noqa: BLE001 - one bad apply must not end the listener
            log.warning("stop broadcast: applying a %s stop failed", msg["kind"], exc_info=True)


# ----------------------------------------------------------------------------- lifespan


async def start(app) -> None:
    """From the app's lifespan: with a Redis `REDIS_URL`, `app.state.stop_broadcast` publishes
    and listens; otherwise it is None and stops stay in this process."""

    settings = app.state.settings
    app.state.stop_broadcast = None
    if uses_redis(settings):
        session_factory = getattr(app.state, "session_factory", None)
        on_subscribed = (lambda: reconcile(app, session_factory)) if session_factory is not None else None
        try:
            app.state.stop_broadcast = StopBroadcast(settings.redis_url, lambda msg: apply(app, msg),
                                                     on_subscribed=on_subscribed).start()
        except Exception as e:  # noqa: BLE001 - e.g. a URL redis-py cannot parse: serve, stops stay local
            log.error("stop broadcast disabled: %s", type(e).__name__)


async def shutdown(app) -> None:
    import asyncio

    bus = getattr(app.state, "stop_broadcast", None)
    if bus is not None:
        app.state.stop_broadcast = None
        await asyncio.to_thread(bus.stop)
