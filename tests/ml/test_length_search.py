"""The prefix-length search: packed candidates train as they would alone, in one forward per step,
and successive halving keeps the better half, then the shortest within the tolerance."""

import math

import pytest
import torch

from app.ml.base import load_base
from app.ml.callbacks import TrainingCallbacks
from app.ml.config import PrefixTrainingConfig
from app.ml.length_search import (
    LengthSearchError,
    _keep,
    candidate_lengths,
    rung_steps,
    search_prefix_length,
)
from app.ml.train import train_prefix
from tests.ml.test_train import FILL, SMALL, SMALL_VALID, cfg, make_learnable_base, task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, tiny_base_dirs):
    return load_base(tiny_base_dirs[request.param])


class Recorder(TrainingCallbacks):
    def __init__(self):
        self.progress, self.rungs = [], []

    def on_progress(self, p):
        self.progress.append(p)

    def on_search_rung(self, step, rung):
        self.rungs.append(rung)


def test_grid_and_rungs():
    assert candidate_lengths(64) == [1, 2, 4, 8, 16, 32, 64]
    assert candidate_lengths(200) == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert candidate_lengths(5) == [1, 2, 4]
    with pytest.raises(ValueError):
        candidate_lengths(0)
    assert rung_steps(8, 80) == [10, 20, 40]  # three halvings: 8 -> 4 -> 2 -> 1
    assert rung_steps(9, 64) == [4, 8, 16, 32]
    assert rung_steps(1, 50) == []


def test_keep_takes_the_better_half_then_the_shortest_within_tolerance():
    class C:
        def __init__(self, n):
            self.length = n

    a, b, c, d = C(2), C(4), C(8), C(16)
    assert [x.length for x in _keep([a, b, c, d], [1.5, 1.0, 1.1, 2.0], last=False, tolerance=0.02)] == [4, 8]
    assert [x.length for x in _keep([b, c], [1.00, 1.01], last=True, tolerance=0.02)] == [4]
    assert [x.length for x in _keep([b, c], [1.10, 1.00], last=True, tolerance=0.02)] == [8]
    assert [x.length for x in _keep([b, c], [1.015, 1.00], last=True, tolerance=0.02)] == [4]


def test_a_packed_candidate_follows_its_own_trajectory_in_one_forward_per_step(base):
    config = cfg(n_epochs=2, batch_size=4, log_every=1)  # 24 rows: 12 steps of 4
    calls = []
    inner = base.model.forward

    class CountPerStep(Recorder):
        def on_progress(self, p):
            super().on_progress(p)
            self.calls_at_step = getattr(self, "calls_at_step", []) + [list(calls)]

    def counting_forward(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return inner(*a, **k)

    base.model.forward = counting_forward
    try:
        rec = CountPerStep()
        res = search_prefix_length(base, SMALL, SMALL_VALID, config, [2, 4, 8, 16], callbacks=rec)
    finally:
        del base.model.forward
    assert res.result.steps == 12 and [r["step"] for r in rec.rungs] == [3, 6]  # 4 -> 2 -> 1
    rung_steps_seen = {r["step"] for r in rec.rungs}
    before = []
    for step, seen in enumerate(rec.calls_at_step, start=1):
        new_calls = seen[len(before):]
        live = 4 if step <= 3 else 2 if step <= 6 else 1
        # the training forward of this step: one call carrying every live candidate's copy
        assert new_calls[0] == 4 * live
        if step not in rung_steps_seen:
            assert len(new_calls) == 1
        before = seen

    # each candidate's losses equal the same candidate trained alone, for the steps it trained
    for length, packed in res.train_losses.items():
        alone = Recorder()
        train_prefix(base, SMALL, None, cfg(n_epochs=2, batch_size=4, log_every=1, num_virtual_tokens=length),
                     callbacks=alone)
        alone_losses = [p.train_loss for p in alone.progress][: len(packed)]
        assert len(packed) >= 3
        assert packed == pytest.approx(alone_losses, rel=1e-4, abs=1e-5), length
    assert res.result.adapter.config.num_virtual_tokens == res.chosen
    assert res.base_rows == 4 * (3 * 4 + 3 * 2 + 6 * 1)


def test_the_search_learns_and_records_its_curve():
    learnable = make_learnable_base()
    train, held = task(FILL[:12]), task(FILL[12:])  # 96 rows; held-out prompts have unseen fillers
    config = PrefixTrainingConfig(prefix_projection=True, n_epochs=3, batch_size=8, learning_rate=5e-3)
    res = search_prefix_length(learnable, train, held, config, [1, 4, 16])
    assert {c["num_virtual_tokens"] for c in res.curve} == {1, 4, 16}
    losses = {c["num_virtual_tokens"]: c["valid_loss"] for c in res.curve}
    assert all(v is not None for v in losses.values()) and res.chosen in losses
    assert res.result.metrics["valid_loss"] < 0.5 * math.log(len(learnable.tokenizer))  # uniform: ~6
    one_run_rows = 3 * 96
    assert one_run_rows < res.base_rows <= 2.5 * one_run_rows


def test_chunked_packing_gives_the_same_search(base):
    a = search_prefix_length(base, SMALL, SMALL_VALID, cfg(n_epochs=1, batch_size=4), [2, 8])
    b = search_prefix_length(base, SMALL, SMALL_VALID, cfg(n_epochs=1, batch_size=4), [2, 8], max_packed_rows=4)
    assert a.chosen == b.chosen
    for x, y in zip(a.curve, b.curve, strict=True):
        assert x["valid_loss"] == pytest.approx(y["valid_loss"], rel=1e-4)


def test_a_search_without_validation_data_is_refused(base):
    with pytest.raises(LengthSearchError):
        search_prefix_length(base, SMALL, None, cfg(), [2, 4])
