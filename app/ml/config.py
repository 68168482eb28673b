"""What a training run is told: the hyperparameters of both trainers, their one learning-rate
schedule, and the presets a new base is built from.

Both trainers use one set of names, Hugging Face's (and the job API's where it has them):
`learning_rate`, `warmup_ratio`, `max_grad_norm`, `n_epochs`, `batch_size`, `max_seq_len`. Nothing
here imports torch, so the job layer resolves a request into a config without loading the engine.
Why each default is what it is, with the measurements behind it: docs/BENCHMARKS.md, "Training
defaults".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# --------------------------------------------------------------------------- the schedule


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float,
                     min_ratio: float = 0.0, decay: str = "cosine") -> float:
    """The learning rate of the step with 0-based index `step`: linear warmup to `peak` over
    `warmup_steps`, then cosine or linear decay to `peak * min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1.0 - min_ratio) * shape)


# --------------------------------------------------------------------------- prefix tuning

# n_epochs=None ("auto"): enough passes for about AUTO_TARGET_STEPS optimizer steps, see `epochs_for`
AUTO_TARGET_STEPS = 2000
AUTO_MIN_EPOCHS = 3
AUTO_MAX_EPOCHS = 100


@dataclass
class PrefixTrainingConfig:
    # -- the prefix
    num_virtual_tokens: int = 16
    # Li & Liang's reparameterisation MLP steadies training on large pre-trained bases; on the small
    # default base the direct table learns and the MLP does not. Folded away at the end either way.
    prefix_projection: bool = False
    projection_hidden_size: int = 512
    init: str = "random"  # 'random' | 'text' | 'adapter'
    init_text: str | None = None  # 'text': defaults to the first training example's text
    init_adapter: Any = None  # 'adapter': an object with .config and .table, or a table tensor
    # -- optimisation
    n_epochs: int | None = None  # None ("auto"): see `epochs_for`
    batch_size: int = 8
    learning_rate: float | None = None  # None: see `peak_learning_rate`
    warmup_ratio: float = 0.06  # of the steps, rounded up
    lr_schedule: str = "cosine"  # 'cosine' | 'linear' decay to 0 after the warmup
    weight_decay: float = 0.01  # decoupled (AdamW); a little generalises better than none or 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    grad_accum_steps: int = 1
    max_seq_len: int = 512  # also capped by the base's positions minus the prefix length
    # -- validation and early stopping
    eval_every: int = 0  # steps; 0: at the end of every epoch
    # evaluations without improvement before stopping; 0 disables. Small validation splits are
    # noisy at a prefix's high learning rate, so the patience is long
    early_stopping_patience: int = 10
    # patience counts only from this fraction of the steps on: while the learning rate is high the
    # validation loss says little about where a run ends
    early_stopping_start: float = 0.5
    # -- checkpoints and reporting
    checkpoint_every: int = 200  # steps; 0: only when cancelled
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    # 'auto': bf16 autocast on CUDA, fp32 elsewhere; 'bf16'; 'no'. The prefix stays fp32 throughout.
    mixed_precision: str = "auto"
    log_every: int = 1  # on_progress every N steps (and on the last)

    @property
    def peak_learning_rate(self) -> float:
        """`learning_rate`, or the default for the prefix's parameterisation: 1e-1 for the direct
        table, 1e-2 through the projection MLP (whose output moves faster per unit of rate)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 1e-2 if self.prefix_projection else 1e-1

    def epochs_for(self, n_train: int) -> int:
        """`n_epochs`, or for "auto" the passes that give about AUTO_TARGET_STEPS optimizer steps,
        within [AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS]. A fixed epoch count fails small datasets: a few
        hundred examples make ~40 steps an epoch, and a prefix needs hundreds of steps at any data
        size; large datasets still get a few passes."""
        if self.n_epochs is not None:
            return int(self.n_epochs)
        per_step = self.batch_size * self.grad_accum_steps
        steps_per_epoch = max(1, math.ceil(max(1, n_train) / per_step))
        return max(AUTO_MIN_EPOCHS, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_TARGET_STEPS / steps_per_epoch)))

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(math.ceil(max(1, n_train) / self.batch_size) / self.grad_accum_steps)

    def total_steps(self, n_train: int) -> int:
        return self.epochs_for(n_train) * self.steps_per_epoch(n_train)

    def warmup_steps(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps)

    def learning_rate_at(self, step: int, total_steps: int) -> float:
        return learning_rate_at(step, total_steps, self.warmup_steps(total_steps), self.peak_learning_rate,
                                decay=self.lr_schedule)

    def validate(self, resuming: bool = False) -> None:
        if self.init not in ("random", "text", "adapter"):
            raise ValueError(f"init must be 'random', 'text' or 'adapter', got {self.init!r}")
        if self.init == "adapter" and self.init_adapter is None and not resuming:
            raise ValueError("init='adapter' needs init_adapter")
        if self.lr_schedule not in ("cosine", "linear"):
            raise ValueError("lr_schedule must be 'cosine' or 'linear'")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError("mixed_precision must be 'auto', 'bf16' or 'no'")
        for name in ("num_virtual_tokens", "n_epochs", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.early_stopping_start <= 1:
            raise ValueError("early_stopping_start must be in [0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.peak_learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")

    def to_dict(self) -> dict:
        """JSON-able; `init_adapter` is left out (a resumed run never re-initialises)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "init_adapter"}

    @classmethod
    def from_dict(cls, d: Mapping) -> PrefixTrainingConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Fields that only say where and how to run, not what is computed: a resumed run takes these from
# the caller (it may run on other hardware), everything else from the checkpoint.
RUNTIME_FIELDS = ("mixed_precision", "checkpoint_every", "keep_checkpoints", "log_every")


# --------------------------------------------------------------------------- base training


@dataclass
class BaseTrainingConfig:
    """Hyperparameters of full-parameter LM training. None fields take the preset's value."""

    steps: int | None = None  # optimizer steps; wins over n_epochs
    n_epochs: float | None = None  # passes over the packed training blocks, when steps is None
    batch_size: int | None = None
    learning_rate: float | None = None
    max_seq_len: int | None = None
    warmup_ratio: float = 0.05  # of the steps, rounded down, at least one step
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    eval_every: int = 0  # 0: evaluate only before and after training
    max_eval_blocks: int = 64  # cap on validation blocks per evaluation (CPU time)
    valid_fraction: float = 0.02  # when no validation texts are given
    # Wall-clock cap for the whole call (tokenizer, packing, training, final eval, save). Training
    # stops early when the next step would not fit; the run is then no longer deterministic
    # (`stopped_by_time_budget` in the metadata says so). None: run all steps.
    time_budget_s: float | None = None

    def warmup_steps(self, total_steps: int) -> int:
        return max(1, int(self.warmup_ratio * total_steps))


# --------------------------------------------------------------------------- base presets


@dataclass(frozen=True)
class Preset:
    """Model shape plus the training hyperparameters that suit it."""

    architecture: str  # "gpt2" | "llama"
    size: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # == num_heads for GPT-2 style
    intermediate_size: int
    max_positions: int
    vocab_size: int  # of the BPE trained for a from-scratch base
    # training defaults
    max_seq_len: int
    batch_size: int
    learning_rate: float
    steps: int
    # std of the normal init of every linear and embedding weight (transformers' initializer_range)
    init_std: float = 0.02


def _presets() -> dict[tuple[str, str], Preset]:
    p = {}
    # name: (hidden, layers, heads, kv_heads(llama), mlp(llama), positions, vocab, seq, batch, learning_rate, steps)
    shapes = {
        "tiny": (64, 2, 4, 2, 172, 256, 2048, 64, 8, 3e-3, 20),
        # The CPU build: small enough to pretrain on a few CPU cores in minutes (docs/BENCHMARKS.md).
        # Full multi-head attention (4 KV heads, not 2): a prefix lives in the KV heads.
        "default": (192, 4, 4, 4, 512, 512, 8192, 128, 8, 3e-3, 400),
        # GPU sizes: ~30M and ~120M parameters
        "small": (512, 8, 8, 4, 1376, 1024, 8192, 512, 32, 1e-3, 20_000),
        "medium": (768, 12, 12, 4, 2048, 2048, 32768, 1024, 32, 6e-4, 50_000),
    }
    for size, (d, n, h, kv, mlp, pos, vocab, seq, bs, rate, steps) in shapes.items():
        # The CPU default starts from a wider init than the usual 0.02: after its few hundred steps
        # a 0.02 start is still a near-bigram model whose last position barely carries the earlier
        # words, so no prefix can make a label depend on one; 0.1 reaches the same perplexity and
        # keeps content-mixing attention that a prefix can steer.
        init_std = 0.1 if size == "default" else 0.02
        p[("gpt2", size)] = Preset("gpt2", size, d, n, h, h, 4 * d, pos, vocab, seq, bs, rate, steps, init_std)
        p[("llama", size)] = Preset("llama", size, d, n, h, kv, mlp, pos, vocab, seq, bs, rate, steps, init_std)
    return p


PRESETS: dict[tuple[str, str], Preset] = _presets()
# Llama style learns faster than GPT-2 style for the same compute on the CPU build.
DEFAULT_ARCHITECTURE = "llama"
DEFAULT_SIZE = "default"


def candidate_lengths(upper: int, lower: int = 1) -> list[int]:
    """The geometric grid 1, 2, 4, ... up to `upper` (which is added when it is not a power of 2)."""
    if upper < lower:
        raise ValueError(f"no prefix length fits: the bound is {upper}")
    out, p = [], 1
    while p <= upper:
        if p >= lower:
            out.append(p)
        p *= 2
    if out[-1] != upper and upper >= 128:  # the grid's top is worth trying only for long prefixes
        out.append(upper)
    return out
