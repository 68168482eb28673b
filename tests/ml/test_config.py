"""The one learning-rate schedule both trainers use, and the shared checkpoint reader."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.ml.checkpoint import newest_checkpoint, save_checkpoint
from app.ml.config import BaseTrainingConfig, PrefixTrainingConfig, learning_rate_at


def test_schedule_warms_up_then_decays_to_its_floor():
    rates = [learning_rate_at(s, 100, 10, 1.0, min_ratio=0.1) for s in range(100)]
    assert rates[:3] == pytest.approx([0.1, 0.2, 0.3]) and rates[9] == 1.0
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))  # decays after the warmup
    assert rates[-1] > 0.1 and learning_rate_at(100, 100, 10, 1.0, min_ratio=0.1) == pytest.approx(0.1)
    linear = [learning_rate_at(s, 10, 0, 2.0, decay="linear") for s in range(10)]
    assert linear == pytest.approx([2.0 * (1 - s / 10) for s in range(10)])


def test_both_configs_use_the_schedule():
    prefix = PrefixTrainingConfig(learning_rate=0.5, warmup_ratio=0.1)
    assert prefix.learning_rate_at(3, 20) == learning_rate_at(3, 20, 2, 0.5)  # warmup rounded up
    assert PrefixTrainingConfig(warmup_ratio=0.15).warmup_steps(10) == 2
    assert BaseTrainingConfig(warmup_ratio=0.15).warmup_steps(10) == 1  # rounded down
    assert BaseTrainingConfig(warmup_ratio=0.0).warmup_steps(10) == 1  # at least one
    assert math.isclose(PrefixTrainingConfig(prefix_projection=True).peak_learning_rate, 1e-2)


def test_reader_skips_checkpoints_of_another_kind_version_or_damaged(tmp_path):
    t = {"x": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, "kind-a", t, {"n": 1}, keep=5)
    save_checkpoint(tmp_path, 2, "kind-a", t, {"n": 2}, keep=5)
    assert newest_checkpoint(tmp_path, "kind-a").state["n"] == 2
    assert newest_checkpoint(tmp_path, "kind-b") is None  # never resumes another trainer's checkpoint
    (tmp_path / "step-00000002" / "tensors.safetensors").write_bytes(b"\0" * 10)  # a cut-short download
    assert newest_checkpoint(tmp_path, "kind-a").state["n"] == 1
    state = json.loads((tmp_path / "step-00000001" / "state.json").read_text())
    (tmp_path / "step-00000001" / "state.json").write_text(json.dumps({**state, "version": 99}))
    assert newest_checkpoint(tmp_path, "kind-a") is None
    save_checkpoint(tmp_path, 3, "kind-a", t, {"n": 3}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]
