"""ServingEngine over a fake continuous batch (pure Python): batching, fairness, streaming, cancel, bounds."""

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from app.config import Settings
from app.serving.engine import BaseChangedError, ServingEngine
from app.serving.scheduler import QueueFullError


@dataclass
class Req:
    prompt_ids: list
    prefix: object = None
    max_tokens: int = 3
    tag: str = ""


@dataclass
class Res:
    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int = 1


@dataclass
class FakeBase:
    fingerprint: str = "fp1"
    model: object = None
    device: str = "cpu"
    batches: list = field(default_factory=list)  # the tags of each group of rows admitted together
    admitted_at: list = field(default_factory=list)  # the step count at each admission
    steps: int = 0
    gate: threading.Event = field(default_factory=threading.Event)  # steps wait for it (set = run)
    bad_tag: str | None = None  # a group holding a row with this tag fails its prefill

    def __post_init__(self):
        self.gate.set()


class FakeBatch:
    """The engine's continuous batch, in pure Python: each step gives every live row the token
    f"{tag}{n} " (its n-th); rows finish at max_tokens or on should_abort."""

    def __init__(self, base):
        self.base = base
        self.rows: dict = {}  # key -> [request, tokens so far, text]

    def __len__(self):
        return len(self.rows)

    def add(self, requests, keys):
        if self.base.bad_tag and any(r.tag == self.base.bad_tag for r in requests):
            raise ValueError("bad row")
        self.base.batches.append([r.tag for r in requests])
        self.base.admitted_at.append(self.base.steps)
        for k, r in zip(keys, requests, strict=False):
            self.rows[k] = [r, 0, ""]
        return []

    def drop(self, keys):
        return [(k, self._result(k, "abort")) for k in keys if k in self.rows]

    def _result(self, key, finish):
        r, n, text = self.rows.pop(key)
        return Res(text, finish, n)

    def step(self, on_token=None, should_abort=None):
        self.base.gate.wait(5)
        time.sleep(0.005)
        self.base.steps += 1
        done = []
        for key, row in list(self.rows.items()):
            r, n, _ = row
            piece = f"{r.tag}{n} "
            row[1], row[2] = n + 1, row[2] + piece
            if on_token:
                on_token(key, n, piece)
            if row[1] >= r.max_tokens:
                done.append((key, self._result(key, "length")))
            elif should_abort and should_abort(key):
                done.append((key, self._result(key, "abort")))
        return done


def make_engine(**overrides):
    s = Settings(**{"batch_window_ms": 50, "max_batch_size": 8, "max_queued_requests": 64, **overrides})
    e = ServingEngine(s, batch_factory=FakeBatch)
    base = FakeBase()
    e.start(lambda: ("tiny", base))
    assert e.wait_ready(5)
    return e, base


def test_concurrent_requests_share_a_batch_and_stream():
    e, base = make_engine()

    async def main():
        h1 = e.submit_generation("A", [Req([1], tag="a")], stream=True)
        h2 = e.submit_generation("B", [Req([1], tag="b"), Req([1], tag="c")])
        tokens = [ev[3] async for ev in h1.events() if ev[0] == "token"]
        r2 = await h2.results()
        return tokens, r2

    tokens, r2 = asyncio.run(main())
    e.stop()
    assert tokens == ["a0 ", "a1 ", "a2 "]
    assert [r.text for r in r2] == ["b0 b1 b2 ", "c0 c1 c2 "]
    assert sorted(base.batches[0]) == ["a", "b", "c"]
    assert len(base.batches) == 1


def test_fairness_through_the_engine():
    e, base = make_engine(max_batch_size=4)
    gate = base.gate
    gate.clear()

    async def main():
        ha = [e.submit_generation("A", [Req([1], max_tokens=1, tag="A")]) for _ in range(40)]
        await asyncio.sleep(0.2)  # the first batch (A only) is running, blocked on the gate
        hb = e.submit_generation("B", [Req([1], max_tokens=1, tag="B")])
        gate.set()
        await asyncio.gather(*(h.results() for h in ha + [hb]))

    asyncio.run(main())
    e.stop()
    where = [i for i, b in enumerate(base.batches) if "B" in b]
    assert where and where[0] <= 2, base.batches


def test_queue_bound_raises():
    e, base = make_engine(max_queued_requests=3)
    gate = base.gate
    gate.clear()

    async def main():
        first = e.submit_generation("A", [Req([1], tag="x")])
        await asyncio.sleep(0.2)  # running, blocked
        queued = [e.submit_generation("A", [Req([1], tag="q")]) for _ in range(3)]
        with pytest.raises(QueueFullError):
            e.submit_generation("B", [Req([1], tag="r")])
        gate.set()
        await asyncio.gather(first.results(), *(h.results() for h in queued))

    asyncio.run(main())
    e.stop()


def test_cancel_aborts_the_row_and_others_finish():
    e, base = make_engine()

    async def main():
        h1 = e.submit_generation("A", [Req([1], max_tokens=200, tag="a")], stream=True)
        h2 = e.submit_generation("B", [Req([1], max_tokens=5, tag="b")])
        async for ev in h1.events():
            if ev[0] == "token":
                h1.cancel()
            if ev[0] == "done":
                r1 = ev[2]
        return r1, (await h2.results())[0]

    t0 = time.monotonic()
    r1, r2 = asyncio.run(main())
    e.stop()
    assert r1.finish_reason == "abort" and r1.completion_tokens < 50
    assert r2.finish_reason == "length"
    assert time.monotonic() - t0 < 2


def test_base_switch_fails_queued_rows_of_the_old_base():
    e, base = make_engine()
    gate = base.gate
    gate.clear()

    async def main():
        first = e.submit_generation("A", [Req([1], tag="x")])
        await asyncio.sleep(0.2)
        queued = e.submit_generation("A", [Req([1], tag="q")])
        e.set_base("other", FakeBase(fingerprint="fp2"))
        gate.set()
        await first.results()
        with pytest.raises(BaseChangedError):
            await queued.results()
        assert e.base_id == "other"

    asyncio.run(main())
    e.stop()


def test_run_call_runs_on_scheduler_thread():
    e, base = make_engine()

    async def main():
        return await e.run_call("A", lambda b: (threading.current_thread().name, b.fingerprint))

    assert asyncio.run(main()) == ("prefixd-scheduler", "fp1")
    e.stop()


def test_not_ready_before_load_and_load_error_reported():
    s = Settings()
    e = ServingEngine(s, batch_factory=FakeBatch)

    def bad():
        raise RuntimeError("no such dir")

    e.start(bad)
    e.wait_ready(5)
    assert not e.ready and "no such dir" in e.error
    e.stop()


def test_cancel_key_fails_queued_and_running_rows_of_that_key_only():
    from app.serving.engine import RequestCancelledError

    e, base = make_engine(max_batch_size=1)

    async def main():
        running = e.submit_generation("A", [Req([1], max_tokens=400, tag="r")], key="k1")
        await asyncio.sleep(0.2)  # now running
        queued = e.submit_generation("A", [Req([1], tag="q")], key="k1")
        other = e.submit_generation("A", [Req([1], tag="o")], key="k2")
        assert e.cancel_key("k1") == 2
        for h in (running, queued):
            with pytest.raises(RequestCancelledError, match="revoked"):
                await asyncio.wait_for(h.results(), 5)
        assert (await asyncio.wait_for(other.results(), 5))[0].finish_reason == "length"

    asyncio.run(main())
    e.stop()


def test_a_failing_row_does_not_fail_its_batch_neighbours():
    e, base = make_engine()
    base.bad_tag = "bad"

    async def main():
        good = e.submit_generation("A", [Req([1], tag="g")])
        bad = e.submit_generation("B", [Req([1], tag="bad")])
        with pytest.raises(ValueError):
            await bad.results()
        return (await good.results())[0]

    assert asyncio.run(main()).text == "g0 g1 g2 "
    e.stop()


@pytest.mark.parametrize("max_batch,a_tokens", [(4, None), (32, None), (8, 30), (32, 30)])
def test_b_is_admitted_within_two_steps_while_a_has_200_requests_queued_and_running(max_batch, a_tokens):
    """A's rows end at staggered steps (1-3 tokens), or all together (a_tokens each): B still joins
    within 2 steps (the reserved slots), not when A's batch ends."""
    e, base = make_engine(max_batch_size=max_batch, max_queued_requests=1000)

    async def main():
        ha = [e.submit_generation("A", [Req([1], max_tokens=a_tokens or 1 + i % 3, tag="A")]) for i in range(200)]
        while base.steps < 3:  # A's rows are cycling through a full batch
            await asyncio.sleep(0.005)
        assert len(e.scheduler) > 50 and len(e.running_items()) >= max_batch // 2
        if a_tokens:  # A's rows run from the same step to the same step
            assert base.steps < a_tokens and len(base.batches) == 1
        at = base.steps
        hb = e.submit_generation("B", [Req([1], max_tokens=2, tag="B")])
        await hb.results()
        for h in ha:
            h.cancel()
        return at

    submitted_at = asyncio.run(main())
    e.stop()
    b = next(i for i, tags in enumerate(base.batches) if "B" in tags)
    assert base.admitted_at[b] <= submitted_at + 2, (base.admitted_at[b], submitted_at)


def test_cancelling_a_running_row_frees_its_slot_for_a_queued_one():
    e, base = make_engine(max_batch_size=1)

    async def main():
        long = e.submit_generation("A", [Req([1], max_tokens=10_000, tag="long")], stream=True)
        await long.next_event(5)  # running
        queued = e.submit_generation("B", [Req([1], max_tokens=2, tag="q")])
        await asyncio.sleep(0.05)
        assert base.batches == [["long"]]  # no free slot: B waits
        at = base.steps
        long.cancel()
        res = (await asyncio.wait_for(queued.results(), 5))[0]
        return at, res

    at, res = asyncio.run(main())
    e.stop()
    assert res.text == "q0 q1 "
    assert base.batches[1] == ["q"] and base.admitted_at[1] <= at + 1  # at the next step


def test_calls_run_between_steps_of_a_full_batch():
    e, base = make_engine(max_batch_size=2)

    async def main():
        ha = [e.submit_generation("A", [Req([1], max_tokens=300, tag="A")]) for _ in range(4)]
        while base.steps < 3:
            await asyncio.sleep(0.005)
        steps = base.steps
        got = await asyncio.wait_for(e.run_call("B", lambda b: b.fingerprint), 5)
        assert base.steps - steps < 50  # long before A's rows end (300 steps)
        for h in ha:
            h.cancel()
        return got

    assert asyncio.run(main()) == "fp1"
    e.stop()
