"""A fair, bounded request queue that hands out work for a continuous batch (pure logic: no
torch, no asyncio).

Every queued unit is a `WorkItem` (one generated row, or one scoring call). Items wait in
per-tenant FIFO queues. `take(max_size, live=...)` picks items one at a time, each time from the
tenant with the fewest rows already running (`live`) plus rows taken in this call, ties broken
round-robin, and the rotation carries over from call to call. So however many requests tenant A
has queued or running, tenant B's request is taken at the next opportunity: nobody waits behind
another tenant's backlog. A prefill budget (`budget`, in `WorkItem.cost` units: prompt tokens)
keeps one admission from stalling the running rows' decode for long; calls (scoring) can be
limited separately (`max_calls`) since they take no slot in the batch.

`next_batch` is for an idle engine and adds the gathering window: it blocks until something is
queued, then keeps gathering while requests keep arriving: until `max_size` items are queued, or
nothing new came for `window_s`, or the oldest queued item has waited `GATHER_CAP` windows,
whichever comes first. A lone request waits one window; a burst of concurrent requests (which
reach the engine spread out by HTTP parsing and auth) is prefilled together.

The queue is bounded by `max_queued` items, of which one tenant may hold 3/4: `submit` raises
`QueueFullError` (the API answers 429 with `Retry-After`) rather than letting memory grow without
limit, and a flooding tenant cannot fill the queue for everyone else. A request's rows are admitted
all together or not at all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

GATHER_CAP = 4  # the oldest queued item waits at most this many windows for a batch to fill


class QueueFullError(Exception):
    def __init__(self, queued: int, limit: int, retry_after_s: int = 1, tenant: bool = False):
        whose = "this tenant's share of the queue is full" if tenant else "the server is at capacity"
        super().__init__(f"{whose}: {queued} requests queued (limit {limit}); retry later")
        self.queued, self.limit, self.retry_after_s, self.tenant = queued, limit, retry_after_s, tenant


class SchedulerClosedError(Exception):
    pass


@dataclass(eq=False)
class WorkItem:
    """One unit of work. `payload` is whatever the engine runs; `cancelled` is polled by it."""

    tenant_id: str
    payload: Any = None
    kind: str = "generate"  # generate | call
    handle: Any = None  # the request this row belongs to (engine-defined)
    index: int = 0  # choice index within the request
    key: str | None = None  # which credential submitted it (e.g. the API key's hash), for revocation
    cancel_reason: str | None = None  # set when the server (not the client) cancelled it
    cost: int = 0  # prefill work (prompt tokens), counted against `take`'s budget
    enqueued_at: float = field(default_factory=time.monotonic)
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self, reason: str | None = None) -> None:
        if reason and self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel_event.set()


class FairScheduler:
    def __init__(self, max_queued: int, on_drop=None):
        """`on_drop(item)` is called (under the lock; keep it quick) for each cancelled item that
        `take` drops, so its waiter can be told."""
        self.max_queued = max_queued
        # one tenant may fill 3/4 of the queue: however hard it floods, the others can still queue
        self.tenant_limit = max_queued - max_queued // 4
        self._on_drop = on_drop
        self._queues: dict[str, deque[WorkItem]] = {}
        self._active: deque[str] = deque()  # tenants with queued items, in round-robin order
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False
        self._last_arrival = 0.0

    # -- producers ---------------------------------------------------------------------------
    def submit(self, items: list[WorkItem]) -> None:
        """Queue all of `items` or none of them."""
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the serving engine is shutting down")
            if self._size + len(items) > self.max_queued:
                raise QueueFullError(self._size, self.max_queued)
            for tenant in {item.tenant_id for item in items}:
                queued = len(self._queues.get(tenant, ()))
                if queued + sum(item.tenant_id == tenant for item in items) > self.tenant_limit:
                    raise QueueFullError(queued, self.tenant_limit, tenant=True)
            for item in items:
                q = self._queues.get(item.tenant_id)
                if q is None:
                    q = self._queues[item.tenant_id] = deque()
                    self._active.append(item.tenant_id)
                q.append(item)
            self._size += len(items)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()

    # -- the consumer ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def depth_by_tenant(self) -> dict[str, int]:
        with self._cond:
            return {t: len(q) for t, q in self._queues.items()}

    def take(self, max_size: int, live: dict[str, int] | None = None, budget: int | None = None,
             max_calls: int | None = None, newcomers_only: bool = False) -> list[WorkItem]:
        """Up to `max_size` items, each from the tenant with the fewest `live` (running) plus
        already-taken items, ties round-robin. Generation items stop once their `cost` would pass
        `budget` (the first always fits; a budget of 0 takes none). With `max_calls`, calls are
        counted apart (up to `max_calls`) instead of against `max_size`. `newcomers_only`: only
        from tenants with no `live` rows. Cancelled items are dropped."""
        with self._cond:
            return self._take_locked(max_size, live, budget, max_calls, newcomers_only)

    def _fits(self, item: WorkItem, n_batch: int, n_gen: int, n_calls: int, spent: int, max_size: int,
              budget: int | None, max_calls: int | None) -> bool:
        if item.kind == "call" and max_calls is not None:
            return n_calls < max_calls
        if (n_batch if max_calls is None else n_gen) >= max_size:
            return False
        if item.kind == "call" or budget is None:
            return True
        return budget > 0 and (spent == 0 or spent + item.cost <= budget)

    def _drop_cancelled_heads_locked(self) -> None:
        for tenant in list(self._active):
            q = self._queues[tenant]
            while q and q[0].cancelled:
                item = q.popleft()
                self._size -= 1
                if self._on_drop is not None:
                    self._on_drop(item)
            if not q:
                del self._queues[tenant]
                self._active.remove(tenant)

    def _take_locked(self, max_size: int, live: dict[str, int] | None = None, budget: int | None = None,
                     max_calls: int | None = None, newcomers_only: bool = False) -> list[WorkItem]:
        live = live or {}
        batch: list[WorkItem] = []
        taken: dict[str, int] = {}
        n_gen = n_calls = spent = 0
        while True:
            self._drop_cancelled_heads_locked()
            best, best_load = None, None
            for pos, tenant in enumerate(self._active):  # earliest in the rotation wins a tie
                if newcomers_only and live.get(tenant, 0):
                    continue
                head = self._queues[tenant][0]
                if not self._fits(head, len(batch), n_gen, n_calls, spent, max_size, budget, max_calls):
                    continue
                load = live.get(tenant, 0) + taken.get(tenant, 0)
                if best_load is None or load < best_load:
                    best, best_load = pos, load
            if best is None:
                return batch
            tenant = self._active[best]
            del self._active[best]
            q = self._queues[tenant]
            item = q.popleft()
            self._size -= 1
            if q:
                self._active.append(tenant)
            else:
                del self._queues[tenant]
            taken[tenant] = taken.get(tenant, 0) + 1
            if item.kind == "call":
                n_calls += 1
            else:
                n_gen += 1
                spent += item.cost
            batch.append(item)

    def _oldest_locked(self) -> float | None:
        heads = [q[0].enqueued_at for q in self._queues.values() if q]
        return min(heads) if heads else None

    def next_batch(self, max_size: int, window_s: float, timeout: float | None = None,
                   budget: int | None = None) -> list[WorkItem]:
        """Block for the next batch (empty on timeout or close)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return []
                if self._size == 0:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return []
                    self._cond.wait(remaining)
                    continue
                oldest = self._oldest_locked() or time.monotonic()
                gather_until = min(self._last_arrival + window_s, oldest + GATHER_CAP * window_s)
                wait = gather_until - time.monotonic()
                if self._size >= max_size or wait <= 0:
                    batch = self._take_locked(max_size, budget=budget)
                    if batch:
                        return batch
                    continue  # everything queued had been cancelled
                self._cond.wait(wait)

    def queued_items(self) -> list[WorkItem]:
        with self._cond:
            return [item for q in self._queues.values() for item in q]

    def drain(self) -> list[WorkItem]:
        with self._cond:
            out = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._active.clear()
            self._size = 0
            return out

    def close(self) -> list[WorkItem]:
        """Refuse new work, wake the consumer, and hand back what was still queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return self.drain()
