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


def test_evict_owner_evicts_only_that_owners_entries():
    c = AdapterCache(3)
    c.get("ft:b:t1:x:j1", str.upper, owner="t1")
    c.get("ft:b:t2:x:j2", str.upper, owner="t2")
    c.get("ft:b:t1:y:j3", str.upper, owner="t1")
    c.get("ft:b:t2:x:j2", str.lower, owner="t1")  # a hit keeps the entry's owner
    assert c.owner("ft:b:t2:x:j2") == "t2"
    assert sorted(c.evict_owner("t1")) == ["ft:b:t1:x:j1", "ft:b:t1:y:j3"]
    assert c.keys() == ["ft:b:t2:x:j2"] and c.evict_owner("t1") == []
    assert c.owner("ft:b:t1:x:j1") is None
    # entries pushed out by the LRU, evicted by id or cleared forget their owner
    c.get("a", str.upper, owner="t3")
    c.get("b", str.upper, owner="t3")
    c.get("c", str.upper, owner="t3")  # pushes out the t2 entry
    assert c.owner("ft:b:t2:x:j2") is None and c.evict_owner("t2") == []
    c.evict("a")
    assert c.owner("a") is None
    c.clear()
    assert c.evict_owner("t3") == [] and c._owners == {}


def test_evict_owner_during_a_load_is_not_stored():
    c = AdapterCache(4)

    def load_then_owner_deleted(key):
        assert c.evict_owner("t1") == []  # e.g. the tenant was deleted while the blob was read
        return key

    assert c.get("a", load_then_owner_deleted, owner="t1") == "a"
    assert "a" not in c and c.owner("a") is None
    assert c.get("a", str.upper, owner="t1") == "A"  # a later load is stored again
