"""Prefix tuning (Li & Liang 2021): learn a prefix table for a frozen base model.

Read top to bottom: the result, init, the loss of one batch, the loop, checkpoints. The config and
its learning-rate schedule are `app/ml/config.py`.

How the prefix enters the model is `app/ml/kvcache.py`, the same rule scoring and generation use:
the batch's one prefix is expanded over the rows (`batch_prefixes`), given to the model as a
`FrozenPrefixCache`, the mask is `[prefix | tokens]` and position ids are `positions_from_mask`.
The loss counts completion tokens and the EOS only (`app/ml/data.py` masks the prompt).

The base never changes: its parameters are frozen for the run, and it runs with eval-mode numerics
(no dropout), so a step is a deterministic function of (prefix, optimizer state, batch). That makes
three things exact on CPU: the same seed gives the same prefix bit for bit, a resumed run ends
exactly where an uninterrupted one does, and gradient checkpointing gives the gradients of a run
without it.

Checkpoints (`checkpoint_dir/step-000123/`, see `app/ml/checkpoint.py`) hold the prefix
parameters, AdamW moments, the best table so far and the RNG states as tensors, and the step,
config, progress, and data and base fingerprints as JSON. A checkpoint describes itself:
`train_prefix` resumes from the newest one in `checkpoint_dir` using the config stored in it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from app.ml.adapter import Adapter
from app.ml.callbacks import Progress, TrainingCallbacks
from app.ml.checkpoint import (
    Checkpoint,
    newest_checkpoint,
    optimizer_tensors,
    read_checkpoint,
    restore_optimizer,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from app.ml.config import RUNTIME_FIELDS, PrefixTrainingConfig
from app.ml.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    bucket_batches,
    collate,
    example_from_record,
    sorted_batches,
    tokenize_example,
)
from app.ml.kvcache import FrozenPrefixCache, ModelGeometry, batch_prefixes, keeps_logits_by_mask, positions_from_mask
from app.ml.prefix import PrefixConfig, PrefixEncoder, key_values_to_table

__all__ = ["TrainResult", "checkpoint_table", "text_table", "train_prefix"]

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "prefixd-prefix-train-checkpoint"


@dataclass
class TrainResult:
    adapter: Adapter  # the folded table with its metadata
    metrics: dict
    cancelled: bool
    steps: int
    table: torch.Tensor | None = None  # the returned prefix, [P, width] float32 on CPU
    prefix_config: PrefixConfig | None = None  # projection-free geometry of `table`


# ----------------------------------------------------------------------------------------------
# init


def _make_encoder(
    config: PrefixTrainingConfig, geometry: ModelGeometry, base, examples, init: str
) -> PrefixEncoder:
    pcfg = PrefixConfig(
        num_layers=geometry.num_layers,
        num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        projection_hidden_size=config.projection_hidden_size,
        embedding_dim=geometry.hidden_size,
    )
    encoder = PrefixEncoder(pcfg)  # random init from the (seeded) global RNG
    if init == "random":
        return encoder
    if init == "text":
        text = config.init_text
        if not text:
            if not examples:
                raise ValueError("init='text' needs init_text or training examples")
            text = examples[0].prompt + examples[0].completion
        target = text_table(base.model, base.tokenizer, text, config.num_virtual_tokens)
    else:
        random_rows = encoder().detach() if not config.prefix_projection else None
        target = _adapter_table(config.init_adapter, pcfg, base, random_rows)
    if config.prefix_projection:
        _fit_projection_output(encoder, target)
    else:
        encoder.set_table(target)
    return encoder


@torch.no_grad()
def text_table(model, tokenizer, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """The prefix table of real text: the frozen base's per-layer keys/values of `text`'s tokens,
    repeated or truncated to P tokens. Such a prefix acts exactly like that text placed before the
    prompt (the tokens start at position P either way), a sensible start when data is small."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("init_text encodes to no tokens")
    ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    device = next(model.parameters()).device
    cache = DynamicCache()
    was_training = model.training
    model.eval()
    try:
        model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
    finally:
        model.train(was_training)
    kvs = [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]
    return key_values_to_table(kvs)


def _adapter_table(source, pcfg: PrefixConfig, base, random_rows) -> torch.Tensor:
    """Transfer init from an existing adapter of the same base. A different P is adapted at the
    far end from the tokens (prefixes are right-aligned, so the rows next to the prompt stay put):
    a longer source keeps its last P rows; a shorter one gets fresh random rows in front."""
    table = source if isinstance(source, torch.Tensor) else source.table
    table = table.detach().float().cpu()
    src_fp = None if isinstance(source, torch.Tensor) else getattr(source, "base_fingerprint", None)
    base_fp = getattr(base, "fingerprint", None)
    if src_fp and base_fp and src_fp != base_fp:
        raise ValueError(f"init_adapter was trained on base {src_fp}, not on this base {base_fp}")
    if table.ndim != 2 or table.shape[1] != pcfg.table_width:
        raise ValueError(f"init_adapter table {tuple(table.shape)} does not fit width {pcfg.table_width}")
    P = pcfg.num_virtual_tokens
    if table.shape[0] >= P:
        return table[-P:].clone()
    if random_rows is None:  # projection: fresh rows from a direct-table random init
        random_rows = PrefixEncoder(PrefixConfig(**{**pcfg.to_dict(), "prefix_projection": False}))().detach()
    return torch.cat([random_rows[: P - table.shape[0]].cpu(), table])


@torch.no_grad()
def _fit_projection_output(encoder: PrefixEncoder, target: torch.Tensor) -> None:
    """Make the projection MLP output `target` exactly at init, keeping its random first layer.

    The output layer's bias is shared by all P rows, so it cannot hold a per-row table by itself.
    Instead: bias = the mean row, and the output weight solves W h_p = target_p - mean for the P
    hidden vectors h_p (minimum-norm least squares). With P <= projection_hidden_size the random
    h_p are independent and the fit is exact up to float error; otherwise it is the best fit.
    """
    emb, lin1, lin2 = encoder.embedding, encoder.mlp[0], encoder.mlp[2]
    h = torch.tanh(lin1(emb.weight)).double()  # [P, hidden]
    t = target.double().to(h.device)
    bias = t.mean(0)
    weight_t = torch.linalg.pinv(h) @ (t - bias)  # [hidden, width]
    lin2.weight.copy_(weight_t.T.to(lin2.weight))
    lin2.bias.copy_(bias.to(lin2.bias))
    err = (encoder().double() - t).abs().max().item()
    if err > 1e-3 * max(1.0, t.abs().max().item()):
        log.warning("projection init reproduces the target table only to %.3g", err)


# ----------------------------------------------------------------------------------------------
# one batch


def _batch_loss(model, encoder, geometry, batch, kv_dtype, amp_ctx, keep_logits: bool):
    """Summed cross-entropy over label tokens of one micro-batch (and the count of real tokens)."""
    device = next(encoder.parameters()).device
    ids = batch["input_ids"].to(device)
    tmask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    B, L = ids.shape
    kv = encoder.key_values()  # fp32, carries the gradient
    batch_kv, pmask = batch_prefixes([kv] * B, geometry, kv_dtype, device)  # same object -> expand
    full = torch.cat([pmask, tmask], dim=1)
    kwargs = dict(
        input_ids=ids,
        attention_mask=full,
        position_ids=positions_from_mask(full, L),
        cache=FrozenPrefixCache(batch_kv),
        use_cache=False,
    )
    if keep_logits and keeps_logits_by_mask(model):
        # Only the positions whose next token is a label need the vocabulary projection: the model
        # returns their logits flattened, [N labels, vocab], nothing else is computed or kept.
        predicts_label = labels[:, 1:] != IGNORE_INDEX
        kwargs["logits_to_keep"] = F.pad(predicts_label, (0, 1), value=False)
        with amp_ctx():
            logits = model(**kwargs).logits
        loss = F.cross_entropy(logits.float(), labels[:, 1:][predicts_label], reduction="sum")
        return loss, int(tmask.sum())
    # Completions sit at the end of every (left-padded) row, so only the last positions need the
    # vocabulary projection: logits from the position before the first label onwards.
    has_label = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(has_label[0]) if len(has_label) else L - 1
    keep = L - first + 1 if first > 0 else L
    if keep_logits:
        kwargs["logits_to_keep"] = keep
    with amp_ctx():
        logits = model(**kwargs).logits
    logits = logits[:, -keep:][:, :-1].float()
    target = labels[:, L - keep + 1 :]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int(tmask.sum())


class _TanhGelu(torch.autograd.Function):
    """A tanh-approximation GELU module (GPT-2's `gelu_new`) that keeps only its input for backward.

    Written as eight elementwise ops (pow, mul, add, mul, tanh, add, mul, mul), such a module makes
    autograd keep four [tokens, 4*hidden] tensors per layer. Here the forward runs the module's own
    ops without autograd (the very same values), and the backward is PyTorch's fused derivative of
    the same function (`gelu_backward(approximate="tanh")`): the exact derivative, equal to the
    chain of the eight ops up to float rounding, computed from the input alone in one pass."""

    @staticmethod
    def forward(ctx, x, module_forward):
        ctx.save_for_backward(x)
        return module_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh"), None


def _tanh_gelu_types() -> tuple[type, ...]:
    """transformers' activation modules that compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    op by op (`gelu_new`, `gelu_fast`, `gelu_accurate`); `gelu_pytorch_tanh` is fused already."""
    import transformers.activations as A

    names = ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation")
    return tuple(t for n in names if isinstance(t := getattr(A, n, None), type))


def _wrap_forward(module, wrapped: list, run_with_grad) -> None:
    """While grad is enabled, `module(...)` runs as `run_with_grad(original_forward, ...)`.
    `wrapped` collects what `_frozen_eval_mode` puts back."""
    own = module.__dict__.get("forward")  # an instance-level forward (e.g. a hook) to restore
    inner = module.forward

    def forward(*args, _inner=inner, **kwargs):
        if torch.is_grad_enabled():
            return run_with_grad(_inner, *args, **kwargs)
        return _inner(*args, **kwargs)

    module.forward = forward
    wrapped.append((module, own))


def _checkpointed(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _lean_tanh_gelu(fn, x):
    return _TanhGelu.apply(x, fn)


@contextmanager
def _frozen_eval_mode(model, gradient_checkpointing: bool, lean_activations: bool = True):
    """Run the base frozen and with eval-mode numerics; put everything back afterwards.

    Lean activations (`lean_activations`, on by default): tanh-GELU modules written op by op (GPT-2's
    `gelu_new`) run as `_TanhGelu`: the same forward values, a fused backward from the input alone.
    On the default GPT-2 base that takes about 50 MiB (40%) off the live peak of a 16 x 96 token
    step, and the step gets faster, not slower (one fused op instead of the autograd chain).

    Gradient checkpointing: transformers' own (`gradient_checkpointing_enable` + `train()`) drops
    the cache inside checkpointed layers, which removes the prefix (why PEFT refuses the combo),
    and needs train mode, which turns dropout on. Instead each decoder layer's forward is wrapped
    in a non-reentrant `torch.utils.checkpoint` while the model stays in eval mode. The prefix
    cache never grows, so the recompute sees exactly the keys of the first pass.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    training = [(m, m.training) for m in model.modules()]
    wrapped: list[tuple[torch.nn.Module, Any]] = []
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        if lean_activations:
            acts = _tanh_gelu_types()
            for m in model.modules():
                if acts and isinstance(m, acts):
                    _wrap_forward(m, wrapped, _lean_tanh_gelu)
        if gradient_checkpointing:
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            if not layers:
                raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers")
            for layer in layers:
                _wrap_forward(layer, wrapped, _checkpointed)
        yield
    finally:
        for layer, own in reversed(wrapped):
            if own is None:
                del layer.forward
            else:
                layer.forward = own
        for m, flag in training:
            m.training = flag
        for p, flag in zip(params, requires_grad, strict=True):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class _RunState:
    """What the loop updates; all but the best table is a checkpoint's `progress`."""

    step: int = 0
    trained_tokens: int = 0
    train_loss: float | None = None
    best_train_loss: float | None = None
    valid_loss: float | None = None
    best_valid_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one, counted from early_stopping_start on
    early_stopped: bool = False
    best_table: torch.Tensor | None = field(default=None, repr=False)  # the prefix at best_step

    def progress(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "best_table"}

    @classmethod
    def from_progress(cls, progress: dict) -> _RunState:
        names = {f.name for f in fields(cls)} - {"best_table"}
        return cls(**{k: v for k, v in progress.items() if k in names})

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "train_loss", "best_train_loss", "valid_loss",
                                              "best_valid_loss", "best_step", "trained_tokens", "early_stopped")}

    def record_train_loss(self, loss: float) -> None:
        self.train_loss = loss
        if self.best_train_loss is None or loss < self.best_train_loss:
            self.best_train_loss = loss

    def record_eval(self, valid_loss: float, config: PrefixTrainingConfig, total_steps: int) -> bool:
        """Track the best evaluation and the patience; True when this one is the new best."""
        self.valid_loss = valid_loss
        if self.best_valid_loss is None or valid_loss < self.best_valid_loss:
            self.best_valid_loss, self.best_step, self.bad_evals = valid_loss, self.step, 0
            return True
        if self.step >= config.early_stopping_start * total_steps:
            self.bad_evals += 1
            patience = config.early_stopping_patience
            self.early_stopped = bool(patience > 0 and self.bad_evals >= patience)
        return False


@dataclass
class _Forward:
    """The loss of a list of tokenized examples under the run's prefix and numerics."""

    model: torch.nn.Module
    encoder: PrefixEncoder
    geometry: ModelGeometry
    pad_id: int
    kv_dtype: torch.dtype
    amp_ctx: Any
    keep_logits: bool

    def loss(self, items: list[TokenizedExample]):
        return _batch_loss(self.model, self.encoder, self.geometry, collate(items, self.pad_id), self.kv_dtype,
                           self.amp_ctx, self.keep_logits)


class _EpochBatches:
    """The micro-batches of each optimizer step: one epoch's length-bucketed batches at a time,
    deterministic in (seed, epoch), so a resumed run takes the batches the interrupted one would."""

    def __init__(self, lengths: list[int], config: PrefixTrainingConfig):
        self.lengths, self.batch_size, self.seed = lengths, config.batch_size, config.seed
        self.accum = config.grad_accum_steps
        self.epoch, self.batches = None, []

    def of_step(self, epoch: int, k: int) -> list[list[int]]:
        """The index batches of the `k`-th step of `epoch`."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, bucket_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self.batches[k * self.accum : (k + 1) * self.accum]


def configure_optimizer(encoder: PrefixEncoder, config: PrefixTrainingConfig) -> torch.optim.AdamW:
    """AdamW over every prefix parameter, decoupled weight decay on all of them (the prefix is all
    matrices and one projection MLP; its few biases are too few to matter)."""
    return torch.optim.AdamW(encoder.parameters(), lr=config.peak_learning_rate, weight_decay=config.weight_decay)


def _precision(mixed_precision: str, model, device: torch.device):
    """(mode, dtype the prefix's keys and values enter the model in, autocast context factory)."""
    amp = mixed_precision
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "no"
    if amp == "bf16":
        return amp, torch.bfloat16, partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return amp, next(model.parameters()).dtype, nullcontext


def _train_step(forward: _Forward, optimizer, micro_batches: list[list[TokenizedExample]], learning_rate: float,
                max_grad_norm: float) -> tuple[float, int, int]:
    """One optimizer step over its micro-batches (gradient accumulation). The loss is the token-level
    mean over the whole step, however it is split. Returns (summed loss, label tokens, real tokens)."""
    n_labels = sum(x.num_label_tokens for items in micro_batches for x in items)
    for g in optimizer.param_groups:
        g["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = 0.0, 0
    for items in micro_batches:
        loss, ntok = forward.loss(items)
        (loss / n_labels).backward()
        loss_sum += loss.item()
        tokens += ntok
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(forward.encoder.parameters(), max_grad_norm)
    optimizer.step()
    return loss_sum, n_labels, tokens


@torch.no_grad()
def _validation_loss(forward: _Forward, valid_tok: list[TokenizedExample], batch_size: int) -> float:
    """Mean loss per label token over the validation examples."""
    loss_sum, n = 0.0, 0
    for idx in sorted_batches([len(x) for x in valid_tok], batch_size):
        items = [valid_tok[i] for i in idx]
        loss, _ = forward.loss(items)
        loss_sum += loss.item()
        n += sum(x.num_label_tokens for x in items)
    return loss_sum / n


def _eval_due(step: int, config: PrefixTrainingConfig, steps_per_epoch: int, total_steps: int) -> bool:
    if step == total_steps:
        return True
    return step % config.eval_every == 0 if config.eval_every > 0 else step % steps_per_epoch == 0


def _as_examples(items, tokenizer) -> list[Example]:
    out = []
    for x in items or []:
        out.append(x if isinstance(x, Example) else example_from_record(x, tokenizer))
    return out


def _fingerprint(*datasets: Sequence[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for data in datasets:
        h.update(json.dumps([[x.input_ids, x.labels] for x in data]).encode())
        h.update(b"|")
    return h.hexdigest()


def _resumed_config(config: PrefixTrainingConfig, resume: Checkpoint | None) -> PrefixTrainingConfig:
    """A resumed run computes what the checkpoint's config says and runs as the caller says."""
    if resume is None:
        return config
    saved = resume.state["config"]
    return PrefixTrainingConfig.from_dict({**saved, **{k: getattr(config, k) for k in RUNTIME_FIELDS},
                                           "init_adapter": None})


def train_prefix(
    base,
    train_examples,
    valid_examples=None,
    config: PrefixTrainingConfig | None = None,
    callbacks: TrainingCallbacks | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train a prefix for `base` (needs `.model` and `.tokenizer`; uses `.geometry` and
    `.fingerprint` when present). Examples are `Example`s or JSONL records. Resumes from the newest
    checkpoint in `checkpoint_dir` if there is one. Returns the best prefix by validation loss
    (the final one without validation data), folded to a plain table."""
    callbacks = callbacks or TrainingCallbacks()
    model, tokenizer = base.model, base.tokenizer
    geometry = getattr(base, "geometry", None) or ModelGeometry.of(model.config)
    base_fp = getattr(base, "fingerprint", None)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = newest_checkpoint(ckpt_dir, CHECKPOINT_KIND) if ckpt_dir is not None else None
    config = _resumed_config(config or PrefixTrainingConfig(), resume)
    config.validate(resuming=resume is not None)

    # -- the data and the plan
    train_ex = _as_examples(train_examples, tokenizer)
    valid_ex = _as_examples(valid_examples, tokenizer)
    if not train_ex:
        raise ValueError("no training examples")
    max_len = min(config.max_seq_len, geometry.max_positions - config.num_virtual_tokens)
    train_tok = [tokenize_example(x, tokenizer, max_len) for x in train_ex]
    valid_tok = [tokenize_example(x, tokenizer, max_len) for x in valid_ex]
    data_fp = _fingerprint(train_tok, valid_tok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch, total_steps = config.steps_per_epoch(len(train_tok)), config.total_steps(len(train_tok))
    device = next(model.parameters()).device
    amp, kv_dtype, amp_ctx = _precision(config.mixed_precision, model, device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    # Seeded init inside fork_rng, so the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # -- the prefix and its optimizer: a fresh init, or where the checkpoint left them
        torch.manual_seed(config.seed)
        with torch.no_grad():
            # a resumed run loads its parameters from the checkpoint: no init work needed
            init = "random" if resume is not None else config.init
            encoder = _make_encoder(config, geometry, base, train_ex, init).to(device)
        encoder.train()
        optimizer = configure_optimizer(encoder, config)
        run = _RunState()
        if resume is not None:
            run = _restore(resume, encoder, optimizer, device, data_fp, base_fp)
            log.info("resuming prefix training at step %d of %d", run.step, total_steps)
        forward = _Forward(model, encoder, geometry, pad_id, kv_dtype, amp_ctx, keep_logits)
        batches = _EpochBatches([len(x) for x in train_tok], config)
        save = partial(_save, ckpt_dir, run, encoder, optimizer, config, total_steps, data_fp, base_fp, device,
                       callbacks)

        # -- the loop
        cancelled = False
        start_step, run_tokens, t0 = run.step, 0, time.perf_counter()
        with _frozen_eval_mode(model, config.gradient_checkpointing):
            while run.step < total_steps and not run.early_stopped:
                if callbacks.should_stop():
                    cancelled = True
                    save()
                    break
                epoch, k = divmod(run.step, steps_per_epoch)
                group = batches.of_step(epoch, k)
                loss_sum, n_labels, tokens = _train_step(
                    forward, optimizer, [[train_tok[i] for i in idx] for idx in group],
                    config.learning_rate_at(run.step, total_steps), config.max_grad_norm)
                run_tokens += tokens
                run.step += 1
                run.trained_tokens += sum(len(train_tok[i]) for idx in group for i in idx)
                run.record_train_loss(loss_sum / n_labels)
                if valid_tok and _eval_due(run.step, config, steps_per_epoch, total_steps):
                    if run.record_eval(_validation_loss(forward, valid_tok, config.batch_size), config, total_steps):
                        run.best_table = _table_of(encoder)
                    callbacks.on_eval(run.step, run.metrics())
                if run.step % config.log_every == 0 or run.step == total_steps or run.early_stopped:
                    callbacks.on_progress(_progress(run, epoch, total_steps, start_step, run_tokens, t0))
                if config.checkpoint_every > 0 and run.step % config.checkpoint_every == 0 and run.step < total_steps:
                    save()

        # -- the result: the best prefix, else the last
        elapsed = time.perf_counter() - t0
        final_table = _table_of(encoder)
        table = run.best_table if run.best_table is not None else final_table
        metrics = {**run.metrics(), "total_steps": total_steps,
                   "tokens_per_s": run_tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
                   "device": device.type, "mixed_precision": amp}
    folded_cfg = PrefixConfig(**{**encoder.config.to_dict(), "prefix_projection": False})
    adapter = Adapter.from_table(table, folded_cfg, base_fp or "", training={"method": "prefix", **config.to_dict()},
                                 metrics=metrics)
    return TrainResult(adapter, metrics, cancelled, run.step, table, folded_cfg)


def _progress(run: _RunState, epoch: int, total_steps: int, start_step: int, run_tokens: int, t0: float) -> Progress:
    elapsed = time.perf_counter() - t0
    return Progress(
        step=run.step, total_steps=total_steps, epoch=epoch, train_loss=run.train_loss, valid_loss=run.valid_loss,
        tokens_per_s=run_tokens / elapsed if elapsed > 0 else 0.0,
        eta_s=elapsed / max(1, run.step - start_step) * (total_steps - run.step), trained_tokens=run.trained_tokens,
    )


@torch.no_grad()
def _table_of(encoder: PrefixEncoder) -> torch.Tensor:
    """The current prefix as a plain float32 CPU table (the projection MLP folded away)."""
    folded = encoder.fold() if encoder.config.prefix_projection else encoder
    return folded().detach().float().cpu().clone()


# ----------------------------------------------------------------------------------------------
# checkpoints


def _save(root: Path | None, run: _RunState, encoder, optimizer, config: PrefixTrainingConfig, total_steps: int,
          data_fp: str, base_fp: str | None, device, callbacks: TrainingCallbacks) -> None:
    """A checkpoint of the run at its current step (nothing without a checkpoint directory)."""
    if root is None:
        return
    opt_tensors, param_groups = optimizer_tensors(optimizer)
    tensors = {f"prefix.{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tensors.update(opt_tensors)
    if run.best_table is not None:
        tensors["best.table"] = run.best_table.contiguous()
    tensors.update(rng_tensors(device))
    state = {
        "step": run.step, "config": config.to_dict(), "prefix_config": encoder.config.to_dict(),
        "progress": run.progress(), "data_fingerprint": data_fp, "base_fingerprint": base_fp,
        "scheduler": {"kind": config.lr_schedule, "step": run.step, "total_steps": total_steps,
                      "warmup_ratio": config.warmup_ratio, "learning_rate": config.peak_learning_rate},
        "optimizer": {"param_groups": param_groups},
    }
    path = save_checkpoint(root, run.step, CHECKPOINT_KIND, tensors, state, config.keep_checkpoints)
    callbacks.on_checkpoint(run.step, {**run.metrics(), "checkpoint_path": str(path)})


def _restore(resume: Checkpoint, encoder, optimizer, device, data_fp: str, base_fp: str | None) -> _RunState:
    """Prefix parameters, AdamW state, RNG and progress from `resume`, after checking it is this run's."""
    state, tensors = resume.state, resume.tensors
    if state["data_fingerprint"] != data_fp:
        raise ValueError("the checkpoint in checkpoint_dir was written for different training data")
    if state.get("base_fingerprint") and base_fp and state["base_fingerprint"] != base_fp:
        raise ValueError("the checkpoint in checkpoint_dir was written for a different base")
    encoder.load_state_dict(_prefix_weights(tensors))
    restore_optimizer(optimizer, tensors, state["optimizer"]["param_groups"])
    restore_rng(tensors, device)
    if "rng" in state:  # written before the RNG states were tensors: byte lists in the JSON
        restore_rng({f"rng.{k}": torch.tensor(v, dtype=torch.uint8) for k, v in state["rng"].items()}, device)
    run = _RunState.from_progress(state["progress"])
    best = tensors.get("best.table")
    run.best_table = best.float().clone() if best is not None else None
    return run


def _prefix_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}


def checkpoint_table(path: str | os.PathLike) -> tuple[PrefixConfig, torch.Tensor]:
    """The current prefix of one checkpoint directory as (projection-free config, table), e.g. for
    a worker that publishes intermediate checkpoints as adapters."""
    ckpt = read_checkpoint(Path(path), CHECKPOINT_KIND)
    pcfg = PrefixConfig.from_dict(ckpt.state["prefix_config"])
    encoder = PrefixEncoder(pcfg)
    encoder.load_state_dict(_prefix_weights(ckpt.tensors))
    return PrefixConfig(**{**pcfg.to_dict(), "prefix_projection": False}), _table_of(encoder)
