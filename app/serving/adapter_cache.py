"""An LRU cache of loaded prefix adapters, keyed by model id.

Adapters load on first use through a `loader(key) -> value` callable (the engine's loader reads
the blob and turns it into the served base's key/values); later requests hit the cache. The
capacity is `settings.adapter_cache_size`. Deleting an adapter evicts it; switching the served
base clears the cache (entries hold key/values in the old base's dtype and device). An entry may
name its `owner` (the tenant id): deleting a tenant evicts all its entries with `evict_owner`,
loads in progress included, without parsing model ids.

Thread-safe. Two concurrent misses on the same key load it once: the second waits for the first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class AdapterCache(Generic[V]):
    def __init__(
        self,
        capacity: int,
        on_hit: Callable[[], None] | None = None,
        on_miss: Callable[[], None] | None = None,
    ):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be >= 1")
        self.capacity = capacity
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self._generation = 0  # bumped by clear()/evict() so a load racing them is not stored
        self._key_generation: dict[str, int] = {}
        self._owners: dict[str, str] = {}  # key -> owner, for entries and loads in progress
        self.hits = 0
        self.misses = 0
        self._on_hit, self._on_miss = on_hit, on_miss

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def owner(self, key: str) -> str | None:
        with self._lock:
            return self._owners.get(key)

    def get(self, key: str, loader: Callable[[str], V], owner: str | None = None) -> V:
        """The cached value of `key`, loaded with `loader(key)` on a miss; `owner` is recorded with
        an entry this call loads (a hit keeps the entry's owner)."""
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    if self._on_hit:
                        self._on_hit()
                    return self._entries[key]
                pending = self._loading.get(key)
                if pending is None:
                    event = self._loading[key] = threading.Event()
                    generation = (self._generation, self._key_generation.get(key, 0))
                    if owner is not None:
                        self._owners[key] = owner
                    self.misses += 1
                    if self._on_miss:
                        self._on_miss()
                    break
            pending.wait()  # another thread is loading this key; then look again
        try:
            value = loader(key)
            with self._lock:
                if generation == (self._generation, self._key_generation.get(key, 0)):
                    self._entries[key] = value
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.capacity:
                        self._owners.pop(self._entries.popitem(last=False)[0], None)
            return value
        finally:
            with self._lock:
                self._loading.pop(key, None)
                if key not in self._entries:  # not stored (failed, or evicted while loading)
                    self._owners.pop(key, None)
            event.set()

    def peek(self, key: str) -> Any:
        with self._lock:
            return self._entries.get(key)

    def evict(self, key: str) -> bool:
        with self._lock:
            return self._evict_locked(key)

    def evict_owner(self, owner: str) -> list[str]:
        """Evict every entry of `owner`; a load of one in progress is not stored. Returns the
        evicted keys (loads in progress not counted)."""
        with self._lock:
            keys = [k for k, o in self._owners.items() if o == owner]
            return [k for k in keys if self._evict_locked(k)]

    def _evict_locked(self, key: str) -> bool:
        self._key_generation[key] = self._key_generation.get(key, 0) + 1
        if key not in self._loading:
            self._owners.pop(key, None)
        return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._owners = {k: o for k, o in self._owners.items() if k in self._loading}
