import threading
import time

import pytest

from app.serving.adapter_cache import AdapterCache


def test_lru_eviction_order_and_counts():
    loads = []

    def loader(key):
        loads.append(key)
        return key.upper()

    c = AdapterCache(2)
    assert c.get("a", loader) == "A"
    assert c.get("b", loader) == "B"
    assert c.get("a", loader) == "A"  # hit: a becomes most recent
    assert c.get("c", loader) == "C"  # evicts b, the least recently used
    assert c.keys() == ["a", "c"]
    assert "b" not in c
    c.get("b", loader)  # miss again
    assert loads == ["a", "b", "c", "b"]
    assert (c.hits, c.misses) == (1, 4)
    assert c.keys() == ["c", "b"]


def test_evict_and_clear():
    c = AdapterCache(4)
    c.get("a", str.upper)
    c.get("b", str.upper)
    assert c.evict("a") and not c.evict("a")
    assert c.keys() == ["b"]
    c.clear()
    assert len(c) == 0


def test_concurrent_misses_load_once():
    calls = []

    def slow(key):
        calls.append(key)
        time.sleep(0.1)
        return key

    c = AdapterCache(4)
    threads = [threading.Thread(target=c.get, args=("x", slow)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x"]


def test_eviction_during_load_is_not_stored_and_errors_propagate():
    c = AdapterCache(4)

    def load_then_evicted(key):
        c.evict(key)  # e.g. the adapter was deleted while its blob was being read
        return key

    assert c.get("a", load_then_evicted) == "a"
    assert "a" not in c

    def boom(key):
        raise KeyError(key)

    with pytest.raises(KeyError):
        c.get("b", boom)
    assert c.get("b", str.upper) == "B"


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        AdapterCache(0)
