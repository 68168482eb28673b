"""A job's request -> the engine's training config, for both job kinds.

The one place where the API's hyperparameter names (OpenAI's `n_epochs`, `batch_size`,
`learning_rate_multiplier`, and ours: `learning_rate`, `max_seq_len`, `eval_every`; see
`app/jobs/spec.py`) meet the engine's (`app/ml/config.py`). A field left None or "auto" takes the
engine's default, and what the job then runs with comes back as the resolved method, which the
runner writes into the job, as OpenAI does for "auto". Torch-free: only the engine's configs are
imported.
"""

from __future__ import annotations

import math

from app.ml.config import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_SIZE,
    PRESETS,
    BaseTrainingConfig,
    PrefixTrainingConfig,
    candidate_lengths,
)

_PREFIX_FIELDS = ("num_virtual_tokens", "prefix_projection", "projection_hidden_size", "init", "init_text")


class HyperparameterError(ValueError):
    """A request the engine cannot run, naming its parameter (e.g. `method.base.size`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _given(value) -> bool:
    return value not in (None, "auto")


def prefix_training_config(spec: dict, seed: int, n_train: int) -> tuple[PrefixTrainingConfig, dict, int]:
    """`method.prefix` of a job -> (config, the method as resolved, total optimizer steps).

    The learning-rate multiplier scales the engine's default learning rate for this prefix (which
    differs with and without the projection MLP); an absolute `learning_rate` wins over it. The
    epoch count is pinned, since the checkpoints carry it."""
    hp = spec.get("hyperparameters") or {}
    kw = {name: spec[name] for name in _PREFIX_FIELDS if spec.get(name) is not None}
    if not isinstance(kw.get("num_virtual_tokens", 0), int):  # a search: the length comes later
        kw.pop("num_virtual_tokens")
    kw.update({name: hp[name] for name in ("n_epochs", "batch_size") if _given(hp.get(name))})
    kw.update({name: hp[name] for name in ("max_seq_len", "eval_every") if hp.get(name) is not None})
    cfg = PrefixTrainingConfig(**kw, seed=seed)
    default_rate = cfg.peak_learning_rate
    if hp.get("learning_rate") is not None:
        cfg.learning_rate = float(hp["learning_rate"])
    elif _given(hp.get("learning_rate_multiplier")):
        cfg.learning_rate = default_rate * float(hp["learning_rate_multiplier"])
    cfg.n_epochs = cfg.epochs_for(n_train)
    total = cfg.total_steps(n_train)
    # ~10 checkpoints per run (at least one every 200 steps), so a lost worker costs little
    cfg.checkpoint_every = max(1, min(200, math.ceil(total / 10)))
    cfg.log_every = 1
    resolved_hp = {"n_epochs": cfg.n_epochs, "batch_size": cfg.batch_size,
                   "learning_rate_multiplier": cfg.peak_learning_rate / default_rate,
                   "learning_rate": cfg.peak_learning_rate, "max_seq_len": cfg.max_seq_len,
                   "eval_every": cfg.eval_every}
    resolved = {**spec, "num_virtual_tokens": cfg.num_virtual_tokens, "prefix_projection": cfg.prefix_projection,
                "projection_hidden_size": cfg.projection_hidden_size if cfg.prefix_projection else None,
                "init": cfg.init, "hyperparameters": resolved_hp}
    return cfg, resolved, total


def searched_lengths(spec: dict, max_num_virtual_tokens: int, free_positions: int) -> list[int] | None:
    """The candidate lengths of a length search (None: the job trains one length). "auto" is the
    geometric grid up to what the settings and the context that the data leaves free allow."""
    p = spec.get("num_virtual_tokens")
    bound = min(max_num_virtual_tokens, free_positions)
    if p == "auto":
        return candidate_lengths(min(bound, 256))
    if isinstance(p, dict):
        lengths = sorted({n for n in p["search"] if n <= bound})
        if not lengths:
            raise HyperparameterError(f"no searched length fits the {bound} positions the data leaves free",
                                      "method.prefix.num_virtual_tokens")
        return lengths
    return None


def base_training_config(spec: dict) -> tuple[BaseTrainingConfig, dict]:
    """`method.base` of a job -> (config, the method as resolved, with its preset's
    `architecture` and `size`). Raises HyperparameterError for a preset that does not exist.

    `n_epochs` "auto" trains the preset's step count; the learning-rate multiplier scales the
    preset's learning rate."""
    hp = spec.get("hyperparameters") or {}
    arch = spec.get("architecture") or DEFAULT_ARCHITECTURE
    size = spec.get("size") or DEFAULT_SIZE
    if (arch, size) not in PRESETS:
        raise HyperparameterError(f"No base preset ({arch}, {size})", "method.base.size")
    preset = PRESETS[(arch, size)]
    rate = hp.get("learning_rate")
    if rate is None and _given(hp.get("learning_rate_multiplier")):
        rate = preset.learning_rate * float(hp["learning_rate_multiplier"])
    cfg = BaseTrainingConfig(
        n_epochs=float(hp["n_epochs"]) if _given(hp.get("n_epochs")) else None,
        batch_size=int(hp["batch_size"]) if _given(hp.get("batch_size")) else None,
        learning_rate=rate, max_seq_len=hp.get("max_seq_len"), eval_every=hp.get("eval_every") or 0,
    )
    resolved_hp = {"n_epochs": hp.get("n_epochs", "auto"), "batch_size": cfg.batch_size or preset.batch_size,
                   "learning_rate_multiplier": hp.get("learning_rate_multiplier", "auto"),
                   "learning_rate": cfg.learning_rate or preset.learning_rate,
                   "max_seq_len": cfg.max_seq_len or preset.max_seq_len, "eval_every": cfg.eval_every}
    return cfg, {**spec, "architecture": arch, "size": size, "hyperparameters": resolved_hp}
