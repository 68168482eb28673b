"""The serving engine: one frozen base, an adapter LRU cache, and one scheduler thread that runs
a continuous, mixed-prefix decode batch.

Flow of a request:
1. The API resolves the model id for the tenant (SQL), then asks `prefix_for(model_id, ...)` for
   the adapter's key/values (LRU cache; loads the blob on a miss; checks the fingerprint).
2. `submit_generation(...)` puts one `WorkItem` per choice into the fair scheduler and returns a
   `RequestHandle` bound to the caller's asyncio loop.
3. The scheduler thread keeps one `DecodeBatch` (app.ml.generate). Between two decode steps it
   drops cancelled rows, admits queued rows into the free slots (each slot to the tenant with the
   fewest running rows, so one tenant's flood cannot starve another; prefill capped per step),
   runs a few queued calls (scoring), then runs one decode step for every live row, whatever mix
   of adapters it holds. Tokens and results go back with `loop.call_soon_threadsafe`. An idle
   engine waits a short gathering window so that a burst is prefilled together.
4. The API reads `handle.events()` (streaming) or `await handle.results()`; if the client goes
   away it calls `handle.cancel()`, and the row leaves the batch before the next step.

Only the scheduler thread runs the model, so torch never runs two forwards at once in this process.
Switching the served base loads the new one in the caller's thread, then swaps it in; the running
batch finishes on the old base while new rows wait, and a queued row that was admitted for the old
base fails with `BaseChangedError` (409).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.ml.adapter import check_compatible
from app.ml.base import load_base, resolve_device, resolve_serving_dtype
from app.ml.generate import DecodeBatch
from app.observability import metrics
from app.serving.adapter_cache import AdapterCache
from app.serving.scheduler import FairScheduler, QueueFullError, SchedulerClosedError, WorkItem

log = logging.getLogger("prefixd.serving")

__all__ = [
    "ServingEngine", "RequestHandle", "ServedBase", "BaseChangedError", "EngineNotReadyError", "RequestCancelledError",
    "QueueFullError", "SchedulerClosedError",
]


class BaseChangedError(Exception):
    """The served base changed between admission and execution of a request."""


class EngineNotReadyError(Exception):
    """No base is loaded yet."""


class RequestCancelledError(Exception):
    """The server cancelled the request (its tenant was suspended, its key revoked, ...)."""


@dataclass
class ServedBase:
    id: str
    base: Any  # app.ml.base.Base
    fingerprint: str
    path: str | None = None


@dataclass
class CachedPrefix:
    fingerprint: str
    key_values: Any  # KV in the served base's dtype/device
    num_virtual_tokens: int
    adapter: Any = None


@dataclass
class _Generate:
    request: Any  # app.ml.generate.GenerationRequest
    fingerprint: str


@dataclass
class _Call:
    fn: Callable[[Any], Any]  # fn(base) -> result, run on the scheduler thread
    fingerprint: str


class RequestHandle:
    """The asyncio side of one request: events arrive from the scheduler thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, stream: bool):
        self.loop = loop
        self.n = n
        self.stream = stream
        self.items: list[WorkItem] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()

    # scheduler-thread side
    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # asyncio side
    def cancel(self, reason: str | None = None) -> None:
        for item in self.items:
            item.cancel(reason)

    @property
    def cancel_reason(self) -> str | None:
        return next((item.cancel_reason for item in self.items if item.cancel_reason), None)

    @property
    def cancelled(self) -> bool:
        return bool(self.items) and all(item.cancelled for item in self.items)

    async def next_event(self, timeout: float | None = None) -> tuple:
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def events(self):
        """Yield ("token", index, token_id, text, logprobs), ("done", index, result), ("error", index, exc)
        until every row has finished."""
        remaining = self.n
        while remaining:
            event = await self._queue.get()
            if event[0] in ("done", "error"):
                remaining -= 1
            yield event

    async def results(self) -> list:
        """The results in choice order; raises the first row error."""
        out: list = [None] * self.n
        async for event in self.events():
            if event[0] == "error":
                self.cancel()
                raise event[2]
            if event[0] == "done":
                out[event[1]] = event[2]
        return out


# Calls (scoring) run between two decode steps of a running batch: a few per step, so that they
# make progress under a full batch without stalling its decode.
CALLS_PER_STEP = 2
# Slots that only a tenant with no running row may take (1/RESERVE of the batch, none below
# RESERVE rows): when one tenant's rows fill the batch and all end at the same step (equal
# max_tokens), a newcomer still joins at the next step instead of waiting for them.
RESERVE = 8
# A prefill forward costs about as much as a decode step of the whole batch, whatever its rows, so
# rows of tenants the batch already serves join in groups, once 1/JOIN_GROUP of the slots are free.
JOIN_GROUP = 4


def load_served_base(settings, path: str):
    """The base at `path` on the configured device (DEVICE) in the serving dtype (SERVING_DTYPE).
    A device this machine lacks raises ValueError naming it, which /readyz then reports."""

    device = resolve_device(settings.device)
    return load_base(str(path), device=device, dtype=resolve_serving_dtype(settings.serving_dtype, device))


class ServingEngine:
    def __init__(
        self,
        settings,
        *,
        batch_factory: Callable[[Any], Any] | None = None,
        adapter_loader: Callable[[str], Any] | None = None,
        check_compatible: Callable[[Any, Any], None] | None = None,
        base_loader: Callable[[str], Any] | None = None,
    ):
        """`batch_factory(base)` makes the continuous batch (default app.ml.generate.DecodeBatch:
        `add(requests, keys)`, `step(on_token, should_abort)`, `drop(keys)`, `len()`);
        `adapter_loader(blob_key) -> Adapter` reads an adapter from storage (set by lifecycle);
        `base_loader(path) -> Base` defaults to app.ml.base.load_base."""
        self.settings = settings
        self.max_batch_size = settings.max_batch_size
        self.max_prefill_tokens = settings.max_prefill_tokens
        self.reserved = self.max_batch_size // RESERVE  # slots kept for tenants with no running row
        self.window_s = settings.batch_window_ms / 1000.0
        self.scheduler = FairScheduler(settings.max_queued_requests, on_drop=self._dropped)
        self.cache: AdapterCache[CachedPrefix] = AdapterCache(
            settings.adapter_cache_size, on_hit=metrics.adapter_cache_hit, on_miss=metrics.adapter_cache_miss
        )
        self._batch_factory = batch_factory
        self._adapter_loader = adapter_loader
        self._check_compatible = check_compatible
        self._base_loader = base_loader
        self._served: ServedBase | None = None
        self._switch_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loader_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.loading = False
        self.error: str | None = None
        self._batch = None  # the DecodeBatch, with the ServedBase it runs on
        self._batch_served: ServedBase | None = None
        self._running: dict[int, WorkItem] = {}  # row key -> item, the rows in the batch
        self._next_key = 0
        self.steps_run = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def base_id(self) -> str | None:
        return self._served.id if self._served else None

    @property
    def served(self) -> ServedBase | None:
        return self._served

    @property
    def status_message(self) -> str:
        if self._served is not None:
            return "ok"
        return self.error or "loading the base model"

    def require_served(self) -> ServedBase:
        served = self._served
        if served is None:
            raise EngineNotReadyError(self.error or "the base model is still loading")
        return served

    def status(self) -> dict:
        served = self._served
        return {
            "ready": served is not None,
            "loading": self.loading,
            "model": served.id if served else None,
            "fingerprint": served.fingerprint if served else None,
            "error": self.error,
            "queued": len(self.scheduler),
            "running": len(self._running),
            "adapter_cache": {"size": len(self.cache), "capacity": self.cache.capacity,
                              "hits": self.cache.hits, "misses": self.cache.misses},
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, load: Callable[[], tuple[str, Any]] | None = None) -> None:
        """Start the scheduler thread and, if given, load the base in a background thread:
        `load()` returns (base_id, Base)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prefixd-scheduler", daemon=True)
            self._thread.start()
        if load is not None:
            self.loading = True

            def run():
                try:
                    base_id, base = load()
                    self.set_base(base_id, base)
                except Exception as exc:  # noqa: BLE001 - reported through /readyz and logs
                    log.exception("loading the served base failed")
                    self.error = f"loading the base failed: {exc}"
                finally:
                    self.loading = False

            self._loader_thread = threading.Thread(target=run, name="prefixd-base-loader", daemon=True)
            self._loader_thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader_thread is not None:
            self._loader_thread.join(timeout)
        return self.ready

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for item in self.scheduler.close():
            item.handle.emit(("error", item.index, SchedulerClosedError("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def set_base(self, base_id: str, base: Any, path: str | None = None) -> None:
        """Serve `base` (an app.ml.base.Base) from the next batch on."""
        fingerprint = str(getattr(base, "fingerprint", "") or "")
        with self._switch_lock:
            self._served = ServedBase(base_id, base, fingerprint, path or getattr(base, "path", None))
            self.cache.clear()
            self.error = None
        log.info("serving base %s (fingerprint %s)", base_id, fingerprint[:16])

    def switch_base(self, base_id: str, path: str) -> ServedBase:
        """Load the base at `path` (blocking, in the caller's thread) and serve it."""
        loader = self._base_loader or (lambda p: load_served_base(self.settings, p))
        served = self._served
        if served is not None and served.id == base_id and served.path and str(served.path) == str(path):
            return served
        base = loader(str(path))
        self.set_base(base_id, base, str(path))
        return self._served

    # -- adapters ----------------------------------------------------------------------------
    def prefix_for(self, model_id: str, blob_key: str, tenant_id: str | None = None) -> CachedPrefix:
        """The served base's key/values for an adapter; loads it on a cache miss. `tenant_id`, the
        adapter's owner, is kept with the cache entry for `evict_tenant`.

        Raises app.ml.adapter.AdapterMismatchError if it was trained for another base."""
        served = self.require_served()

        def load(_key: str) -> CachedPrefix:
            if self._adapter_loader is None:
                raise RuntimeError("no adapter loader configured")
            adapter = self._adapter_loader(blob_key)
            self._compatible(adapter, served.base)
            model = served.base.model
            kv = adapter.key_values(dtype=getattr(model, "dtype", None), device=getattr(served.base, "device", "cpu"))
            return CachedPrefix(served.fingerprint, kv, int(adapter.num_virtual_tokens), adapter)

        entry = self.cache.get(model_id, load, owner=tenant_id)
        if entry.fingerprint != served.fingerprint:  # loaded for a base that is no longer served
            self.cache.evict(model_id)
            entry = self.cache.get(model_id, load, owner=tenant_id)
        metrics.set_adapter_cache_size(len(self.cache))
        return entry

    def _compatible(self, adapter, base) -> None:
        check = self._check_compatible
        (check or check_compatible)(adapter, base)

    def evict(self, model_id: str) -> bool:
        evicted = self.cache.evict(model_id)
        metrics.set_adapter_cache_size(len(self.cache))
        return evicted

    def evict_tenant(self, tenant_id: str) -> int:
        """Evict every cached adapter of a tenant (its deletion); returns how many."""
        evicted = self.cache.evict_owner(tenant_id)
        metrics.set_adapter_cache_size(len(self.cache))
        return len(evicted)

    # -- submission (called from the event loop) ---------------------------------------------
    def submit_generation(
        self, tenant_id: str, requests: list, *, fingerprint: str | None = None, stream: bool = False,
        key: str | None = None,
    ) -> RequestHandle:
        """Queue one row per GenerationRequest (the choices of one API request).

        Raises QueueFullError when the queue is at its bound, EngineNotReadyError before load."""
        served = self.require_served()
        fp = served.fingerprint if fingerprint is None else fingerprint
        handle = RequestHandle(asyncio.get_running_loop(), len(requests), stream)
        handle.items = [
            WorkItem(tenant_id, _Generate(req, fp), kind="generate", handle=handle, index=i, key=key,
                     cost=len(getattr(req, "prompt_ids", ()) or ()))
            for i, req in enumerate(requests)
        ]
        self._submit(handle.items)
        return handle

    async def run_call(self, tenant_id: str, fn: Callable[[Any], Any], *, fingerprint: str | None = None,
                       key: str | None = None):
        """Run `fn(base)` on the scheduler thread, in fair turn with generation (e.g. scoring)."""
        served = self.require_served()
        fp = served.fingerprint if fingerprint is None else fingerprint
        handle = RequestHandle(asyncio.get_running_loop(), 1, False)
        handle.items = [WorkItem(tenant_id, _Call(fn, fp), kind="call", handle=handle, key=key)]
        self._submit(handle.items)
        try:
            return (await handle.results())[0]
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def _submit(self, items: list[WorkItem]) -> None:
        try:
            self.scheduler.submit(items)
        except QueueFullError:
            metrics.rejected("queue_full")
            raise
        metrics.set_queue_depth(len(self.scheduler))

    def cancel_matching(self, *, tenant_id: str | None = None, key: str | None = None,
                        reason: str = "the request was cancelled by the server") -> int:
        """Cancel every queued and running row of a tenant (suspension, deletion) or of one
        credential (key revocation). Their requests fail with RequestCancelledError. Returns how many."""
        if tenant_id is None and key is None:
            return 0
        n = 0
        for item in self.running_items() + self.scheduler.queued_items():
            if (tenant_id is None or item.tenant_id == tenant_id) and (key is None or item.key == key):
                item.cancel(reason)
                n += 1
        return n

    def inflight_credentials(self) -> set[tuple[str, str | None]]:
        """(tenant id, key hash or None) of every queued or running row not yet cancelled: what
        app/tenancy/stop_broadcast.py checks against the database after its listener was cut off. Safe
        from any thread (a snapshot, as `cancel_matching` takes)."""
        return {(item.tenant_id, item.key) for item in self.running_items() + self.scheduler.queued_items()
                if not item.cancelled}

    def cancel_tenant(self, tenant_id: str, reason: str = "the tenant was suspended") -> int:
        return self.cancel_matching(tenant_id=tenant_id, reason=reason)

    def cancel_key(self, key: str, reason: str = "the API key was revoked") -> int:
        return self.cancel_matching(key=key, reason=reason)

    def _dropped(self, item: WorkItem) -> None:
        """A cancelled row left the queue without running: tell its waiter (if any)."""
        item.handle.emit(("error", item.index, RequestCancelledError(item.cancel_reason or "cancelled")))

    # -- the scheduler thread ----------------------------------------------------------------
    def running_items(self) -> list[WorkItem]:
        return list(self._running.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the thread
                log.exception("decode step failed")
                self._fail_running(exc)
        self._fail_running(None)  # stopping: running rows end as aborted

    def _iteration(self) -> None:
        self._drop_cancelled()  # first, so that their slots are free for this step's admissions
        if not self._running:  # idle: block, and gather a burst so that it is prefilled together
            items = self.scheduler.next_batch(self.max_batch_size - self.reserved, self.window_s, timeout=0.5,
                                              budget=self.max_prefill_tokens)
        else:
            items = self._take_for_running_batch()
        metrics.set_queue_depth(len(self.scheduler))
        gens = self._check_admission([item for item in items if item.kind == "generate"])
        if gens:
            self._admit(gens)
        for item in items:
            if item.kind == "call":
                self._run_call(item)
        self._drop_cancelled()  # cancelled while the calls ran
        if self._running:
            self._step()

    def _take_for_running_batch(self) -> list[WorkItem]:
        live, free = self._live_by_tenant(), self._free_slots()
        # tenants with no running row first, into any free slot (the reserve included)
        items = self.scheduler.take(free, live=live, budget=self.max_prefill_tokens, max_calls=0, newcomers_only=True)
        for item in items:
            live[item.tenant_id] = live.get(item.tenant_id, 0) + 1
        spent = sum(item.cost for item in items)
        # then everyone, outside the reserve, in groups; a newcomer's prefill runs anyway, so
        # others' rows may share it whatever their number
        slots = free - len(items) - self.reserved
        if slots < max(1, self.max_batch_size // JOIN_GROUP) and not items:
            slots = 0
        budget = max(0, self.max_prefill_tokens - spent) if items else self.max_prefill_tokens
        return items + self.scheduler.take(max(0, slots), live=live, budget=budget, max_calls=CALLS_PER_STEP)

    def _free_slots(self) -> int:
        served = self._served
        if served is None or self._batch_served is not served:
            return 0  # the base changed: the running batch drains on the old one before new rows join
        return max(0, self.max_batch_size - len(self._running))

    def _live_by_tenant(self) -> dict[str, int]:
        live: dict[str, int] = {}
        for item in self._running.values():
            live[item.tenant_id] = live.get(item.tenant_id, 0) + 1
        return live

    def _check_admission(self, items: list[WorkItem]) -> list[WorkItem]:
        served = self._served
        ok = []
        for item in items:
            if served is None:
                item.handle.emit(("error", item.index, EngineNotReadyError("no base model is loaded")))
            elif item.payload.fingerprint != served.fingerprint:
                item.handle.emit(("error", item.index, BaseChangedError(
                    f"the served base changed to '{served.id}' while the request was queued")))
            else:
                ok.append(item)
        return ok

    def _run_call(self, item: WorkItem) -> None:
        served = self._served
        if self._check_admission([item]) == []:
            return
        if item.cancelled:
            item.handle.emit(("error", item.index, RequestCancelledError(item.cancel_reason or "cancelled")))
            return
        try:
            item.handle.emit(("done", item.index, item.payload.fn(served.base)))
        except Exception as exc:  # noqa: BLE001
            item.handle.emit(("error", item.index, exc))

    def _admit(self, items: list[WorkItem]) -> None:
        """Prefill `items` into the batch. A failing group is retried row by row, so that one bad
        row (a bad prefix, a too-long prompt) fails alone and not its neighbours."""
        if not self._running or self._batch is None:
            factory = self._batch_factory
            factory = factory or DecodeBatch
            self._batch, self._batch_served = factory(self._served.base), self._served
        keys = list(range(self._next_key, self._next_key + len(items)))
        self._next_key += len(items)
        try:
            done = self._batch.add([item.payload.request for item in items], keys)
        except Exception as exc:  # noqa: BLE001
            if len(items) == 1:
                items[0].handle.emit(("error", items[0].index, exc))
                return
            log.warning("prefill of %d rows failed (%s); admitting them one by one", len(items), exc)
            for item in items:
                self._admit([item])
            return
        self._running.update(zip(keys, items, strict=False))
        for key, result in done:
            self._finish(key, result)

    def _finish(self, key: int, result: Any) -> None:
        """A row left the batch with its result, or with the error that ended it alone
        (app.ml.generate.GenerationFailedError: its neighbours go on)."""
        item = self._running.pop(key)
        if isinstance(result, BaseException):
            log.warning("row of tenant %s failed: %s", item.tenant_id, result)
            item.handle.emit(("error", item.index, result))
        elif item.cancel_reason:
            item.handle.emit(("error", item.index, RequestCancelledError(item.cancel_reason)))
        else:
            item.handle.emit(("done", item.index, result))

    def _drop_cancelled(self) -> None:
        """Cancelled rows (client gone, key revoked, tenant suspended) leave before the next step."""
        gone = [key for key, item in self._running.items() if item.cancelled]
        if gone:
            for key, result in self._batch.drop(gone):
                self._finish(key, result)

    def _step(self) -> None:
        running, stop = self._running, self._stop
        rows = len(running)
        prefixes = {id(getattr(item.payload.request, "prefix", None)) for item in running.values()}
        metrics.observe_batch(rows, len(prefixes))

        def on_token(key: int, token_id: int, text: str, logprobs=None) -> None:
            item = running[key]
            if item.handle.stream and not item.cancelled:
                item.handle.emit(("token", item.index, token_id, text, logprobs))

        def should_abort(key: int) -> bool:
            return stop.is_set() or running[key].cancelled

        t0 = time.perf_counter()
        done = self._batch.step(on_token=on_token, should_abort=should_abort)
        metrics.record_tokens(rows, time.perf_counter() - t0)  # every live row took one token
        self.steps_run += 1
        for key, result in done:
            self._finish(key, result)

    def _fail_running(self, exc: BaseException | None) -> None:
        """End every running row: with `exc`, or as aborted (`None`, stopping). A step fails as a
        whole only where no row fails alone (DecodeBatch isolates those), e.g. out of memory; the
        batch state is then unknown, and tokens already went out, so a rerun would repeat them."""
        batch, running = self._batch, dict(self._running)
        self._batch, self._batch_served = None, None
        if exc is None and batch is not None and running:
            try:
                for key, result in batch.drop(list(running)):
                    self._finish(key, result)
                return
            except Exception as drop_exc:  # noqa: BLE001
                exc = drop_exc
        for key, item in running.items():
            self._running.pop(key, None)
            item.handle.emit(("error", item.index, exc or SchedulerClosedError("the server is shutting down")))
