"""ServingEngine with a fake generate function: batching, fairness, streaming, cancel, bounds."""

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
    batches: list = field(default_factory=list)


def fake_generate(base, requests, on_token=None, should_abort=None):
    base.batches.append([r.tag for r in requests])
    out = []
    texts = [""] * len(requests)
    finish = [None] * len(requests)
    for step in range(max(r.max_tokens for r in requests)):
        time.sleep(0.005)
        for i, r in enumerate(requests):
            if finish[i] or step >= r.max_tokens:
                continue
            if should_abort and should_abort(i):
                finish[i] = "abort"
                continue
            piece = f"{r.tag}{step} "
            texts[i] += piece
            if on_token:
                on_token(i, step, piece)
    for i, r in enumerate(requests):
        out.append(Res(texts[i], finish[i] or "length", len(texts[i].split())))
    return out


def make_engine(**overrides):
    s = Settings(**{"batch_window_ms": 50, "max_batch_size": 8, "max_queued_requests": 64, **overrides})
    e = ServingEngine(s, generate_fn=fake_generate)
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
    gate = threading.Event()
    orig = e._generate_fn

    def gated(*a, **k):
        gate.wait(5)
        return orig(*a, **k)

    e._generate_fn = gated

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
    gate = threading.Event()
    orig = e._generate_fn
    e._generate_fn = lambda *a, **k: (gate.wait(5), orig(*a, **k))[1]

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
    gate = threading.Event()
    orig = e._generate_fn
    e._generate_fn = lambda *a, **k: (gate.wait(5), orig(*a, **k))[1]

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
    e = ServingEngine(s, generate_fn=fake_generate)

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
    orig = e._generate_fn

    def picky(b, requests, **kw):
        if any(r.tag == "bad" for r in requests):
            raise ValueError("bad row")
        return orig(b, requests, **kw)

    e._generate_fn = picky

    async def main():
        good = e.submit_generation("A", [Req([1], tag="g")])
        bad = e.submit_generation("B", [Req([1], tag="bad")])
        with pytest.raises(ValueError):
            await bad.results()
        return (await good.results())[0]

    assert asyncio.run(main()).text == "g0 g1 g2 "
    e.stop()
