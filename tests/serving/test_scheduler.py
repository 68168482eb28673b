"""The fair scheduler: round-robin across tenants, FIFO within a tenant, bounded, windowed."""

import threading
import time

import pytest

from app.serving.scheduler import FairScheduler, QueueFullError, SchedulerClosedError, WorkItem


def items(tenant, n, start=0):
    return [WorkItem(tenant, payload=(tenant, start + i)) for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 32])
def test_b_joins_one_of_the_next_two_batches_while_a_has_200_queued(batch_size):
    s = FairScheduler(max_queued=1000)
    for item in items("A", 200):
        s.submit([item])
    # A is mid-flood: one batch of A's has already gone out
    first = s.take(batch_size)
    assert {i.tenant_id for i in first} == {"A"}
    s.submit(items("B", 1))
    assert len(s) == 200 - len(first) + 1
    nxt = [s.take(batch_size), s.take(batch_size)]
    assert any(i.tenant_id == "B" for batch in nxt for i in batch), nxt
    # and with room for two, B is in the very next batch
    if batch_size >= 2:
        assert any(i.tenant_id == "B" for i in nxt[0])


def test_round_robin_interleaves_and_keeps_fifo_per_tenant():
    s = FairScheduler(max_queued=100)
    s.submit(items("A", 5))
    s.submit(items("B", 2))
    s.submit(items("C", 1))
    batch = s.take(6)
    assert [i.payload for i in batch] == [("A", 0), ("B", 0), ("C", 0), ("A", 1), ("B", 1), ("A", 2)]
    assert [i.payload for i in s.take(10)] == [("A", 3), ("A", 4)]
    assert len(s) == 0


def test_rotation_carries_over_between_batches():
    s = FairScheduler(max_queued=100)
    s.submit(items("A", 3))
    s.submit(items("B", 3))
    assert [i.tenant_id for i in s.take(1)] == ["A"]
    assert [i.tenant_id for i in s.take(1)] == ["B"]
    assert [i.tenant_id for i in s.take(1)] == ["A"]


def test_bounded_queue_refuses_whole_request():
    s = FairScheduler(max_queued=5)
    s.submit(items("A", 4))
    with pytest.raises(QueueFullError) as e:
        s.submit(items("B", 2))  # two choices of one request: all or nothing
    assert e.value.limit == 5 and e.value.queued == 4
    assert len(s) == 4
    s.submit(items("B", 1))
    with pytest.raises(QueueFullError):
        s.submit(items("C", 1))
    s.take(3)
    s.submit(items("C", 3))
    assert len(s) == 5


def test_cancelled_items_are_dropped_and_free_their_slot():
    s = FairScheduler(max_queued=10)
    a = items("A", 3)
    s.submit(a)
    a[1].cancel()
    assert [i.payload for i in s.take(10)] == [("A", 0), ("A", 2)]


def test_next_batch_waits_the_window_then_returns_what_came():
    s = FairScheduler(max_queued=10)

    def later():
        time.sleep(0.02)
        s.submit(items("B", 1))

    s.submit(items("A", 1))
    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    batch = s.next_batch(max_size=8, window_s=0.3)
    t.join()
    assert {i.tenant_id for i in batch} == {"A", "B"}
    assert time.monotonic() - t0 >= 0.25


def test_next_batch_returns_at_once_when_full():
    s = FairScheduler(max_queued=10)
    s.submit(items("A", 4))
    t0 = time.monotonic()
    assert len(s.next_batch(max_size=4, window_s=5)) == 4
    assert time.monotonic() - t0 < 1


def test_next_batch_times_out_empty_and_close_wakes():
    s = FairScheduler(max_queued=10)
    assert s.next_batch(4, 0.01, timeout=0.05) == []
    out = []
    t = threading.Thread(target=lambda: out.append(s.next_batch(4, 0.01)))
    t.start()
    time.sleep(0.05)
    s.close()
    t.join(2)
    assert out == [[]]
    with pytest.raises(SchedulerClosedError):
        s.submit(items("A", 1))


def test_a_burst_keeps_gathering_up_to_the_cap():
    from app.serving.scheduler import GATHER_CAP

    s = FairScheduler(max_queued=100)
    window = 0.1
    stop = threading.Event()

    def trickle():  # one arrival every window/2, for 10 windows
        for i in range(20):
            if stop.is_set():
                return
            s.submit(items("B", 1, start=i))
            time.sleep(window / 2)

    s.submit(items("A", 1))
    t = threading.Thread(target=trickle)
    t0 = time.monotonic()
    t.start()
    batch = s.next_batch(max_size=100, window_s=window)
    waited = time.monotonic() - t0
    stop.set()
    t.join()
    assert len(batch) > 3  # more than one window's worth of arrivals
    assert waited < GATHER_CAP * window + 0.15  # but capped


def test_tenant_with_fewer_running_rows_goes_first():
    """Continuous batching: A fills the running batch and the queue; the free slot goes to B."""
    s = FairScheduler(max_queued=1000)
    s.submit(items("A", 200))
    s.submit(items("B", 1))
    assert [i.tenant_id for i in s.take(1, live={"A": 31})] == ["B"]
    # with no one else waiting, A gets every free slot
    assert [i.tenant_id for i in s.take(3, live={"A": 29})] == ["A"] * 3


@pytest.mark.parametrize("max_batch", [2, 4, 32])
def test_b_is_admitted_within_two_steps_while_a_has_200_queued_and_running(max_batch):
    """A step-level simulation of the engine: A keeps the batch full (each of its rows runs 3
    steps) with 200 more queued; B's one request is admitted within the next 2 steps."""
    s = FairScheduler(max_queued=1000)
    s.submit(items("A", 200))
    running = {id(i): (i, 3 + k % 3) for k, i in enumerate(s.take(max_batch))}  # staggered ends
    for _ in range(6):  # A in steady state
        running = {k: (i, n - 1) for k, (i, n) in running.items() if n > 1}
        for i in s.take(max_batch - len(running), live={"A": len(running)}):
            running[id(i)] = (i, 3)
    s.submit(items("B", 1))
    admitted_at = None
    for step in range(2):
        running = {k: (i, n - 1) for k, (i, n) in running.items() if n > 1}  # this step's finished rows leave
        live: dict[str, int] = {}
        for i, _ in running.values():
            live[i.tenant_id] = live.get(i.tenant_id, 0) + 1
        for i in s.take(max_batch - len(running), live=live):
            running[id(i)] = (i, 3)
            if i.tenant_id == "B" and admitted_at is None:
                admitted_at = step
    assert admitted_at is not None


def test_prefill_budget_and_calls_apart():
    s = FairScheduler(max_queued=100)
    s.submit([WorkItem("A", cost=10) for _ in range(5)])
    assert len(s.take(8, budget=25)) == 2
    s.take(8)
    s.submit([WorkItem("B", cost=100), WorkItem("B", cost=1)])
    assert len(s.take(8, budget=25)) == 1  # the first one always fits
    s.submit([WorkItem("C", kind="call") for _ in range(3)])
    got = s.take(0, max_calls=2)  # a full batch still runs queued calls between steps
    assert [i.kind for i in got] == ["call", "call"]
    got = s.take(1, max_calls=1)
    assert sorted(i.kind for i in got) == ["call", "generate"]


def test_one_tenant_cannot_fill_the_whole_queue():
    s = FairScheduler(max_queued=8)
    s.submit(items("A", 6))
    with pytest.raises(QueueFullError, match="this tenant's share") as e:
        s.submit(items("A", 1))
    assert e.value.limit == 6
    s.submit(items("B", 2))  # the others still get in
    with pytest.raises(QueueFullError, match="at capacity"):
        s.submit(items("C", 1))
