"""Cancellation of in-flight requests on every API replica: key revocation, tenant suspension or
deletion; and eviction of deleted adapters from every replica's adapter cache.

Why: auth looks the key up in the database on every request, so every replica refuses a revoked
key's (or suspended tenant's) *new* requests at once. But the requests it already holds, queued
for the batch or decoding, live in one process's `ServingEngine`, and the admin call reaches only
one replica. So the admin route stops them locally, synchronously (`apply`: the engine's
`cancel_key` / `cancel_tenant`, and `RecentlyStopped` for requests between auth and submit), and,
where the deployment has Redis (`REDIS_URL` a `redis://`, `rediss://` or `unix://` URL, as for the
rate windows in app/quotas.py), publishes a small JSON message on a Redis pub/sub channel. Every
replica (the sender too) runs a `StopBroadcast` listener thread that applies each message the same
way. Embedded mode (one process, no Redis) does only the local part.

Messages carry ids, never a raw key: `{"kind": "key", "key_hash": <sha256 hex>}`,
`{"kind": "tenant", "tenant_id": ..., "deleted": bool}` and `{"kind": "tenant_resumed",
"tenant_id": ...}` (an unsuspension: the replicas forget the tenant in `RecentlyStopped`, or they
would cancel its new requests for the rest of its memory). A tenant's deletion also evicts its
adapters from each replica's adapter cache (`ServingEngine.evict_tenant`), and
`{"kind": "adapter_deleted", "model_id": ...}` (DELETE /v1/models/{id}) evicts one adapter
(`ServingEngine.evict`): a replica that still held it in memory would otherwise keep that memory
until the LRU pushed it out (new requests for it are refused anyway: its record is gone). Applying
a message twice does nothing more, so the sender's own copy is applied again rather than filtered
out: each replica then ends in the state of the last message published, whichever replica sent it.

The channel is `prefixd:stops:<db index>` (pub/sub ignores the db index, so deployments sharing a
Redis server on different dbs stay apart). Pub/sub delivers at most once: a replica that is not
connected to Redis when a message is sent misses it, and its requests in flight finish (new ones
are refused by auth as always). The listener reconnects with backoff and never raises into the API.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

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
    from app.api.errors import is_valid_id

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


def apply(app, msg: dict) -> int:
    """Apply a (decoded) stop message in this process; returns how many rows the engine cancelled."""
    from app.api.deps import recently_stopped

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
    backoff); `stop()` ends the thread within about `poll_s`."""

    def __init__(self, redis_url: str, on_message, channel: str | None = None, poll_s: float = 0.25):
        import redis

        self.channel = channel or channel_for(redis_url)
        self.on_message = on_message
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
    from app.quotas import uses_redis

    settings = app.state.settings
    app.state.stop_broadcast = None
    if uses_redis(settings):
        try:
            app.state.stop_broadcast = StopBroadcast(settings.redis_url, lambda msg: apply(app, msg)).start()
        except Exception as e:  # noqa: BLE001 - e.g. a URL redis-py cannot parse: serve, stops stay local
            log.error("stop broadcast disabled: %s", type(e).__name__)


async def shutdown(app) -> None:
    import asyncio

    bus = getattr(app.state, "stop_broadcast", None)
    if bus is not None:
        app.state.stop_broadcast = None
        await asyncio.to_thread(bus.stop)
