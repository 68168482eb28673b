"""Pretraining: create a new base, or continue training one, offline.

- `train_base(...)` is full-parameter causal-LM training, from scratch (it trains the byte-level BPE
  tokenizer first) or continued from an existing base (its tokenizer is kept). It writes a new
  `from_pretrained`-loadable directory atomically, with `base_meta.json`. Given a `checkpoint_dir`,
  it checkpoints (weights, AdamW state, data order, RNG, its BPE; see `app/ml/checkpoint.py`) and
  resumes from the newest checkpoint there, ending bit-identical to an uninterrupted run.
- `build_default_base(out_dir)` is the one call the service makes on first start: stdlib corpus ->
  8k BPE -> the `default` preset -> about four minutes of training on 2 CPU cores; given a
  `checkpoint_dir`, a build killed midway resumes there.

The presets and the hyperparameters are in `app/ml/config.py`; loading a base for serving is
`app/ml/base.py`. Training reads like nanoGPT's: every hyperparameter is resolved once into a
`_Plan`, the optimizer is built by `configure_optimizer`, and `train_base` is the loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from app.ml.base import compute_fingerprint, prepare_tokenizer
from app.ml.callbacks import Progress, TrainingCallbacks
from app.ml.checkpoint import (
    Checkpoint,
    from_json_float,
    newest_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    restore_rng,
    rng_tensors,
    save_checkpoint,
    to_json_float,
)
from app.ml.config import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_SIZE,
    PRESETS,
    BaseTrainingConfig,
    Preset,
    learning_rate_at,
)
from app.ml.corpus import default_corpus, split_train_valid
from app.ml.kvcache import ModelGeometry
from app.ml.tokenizer import train_bytelevel_bpe

META_FILE = "base_meta.json"
CHECKPOINT_KIND = "prefixd-base-train-checkpoint"
_CKPT_TOKENIZER = "tokenizer"
# Keys of a checkpoint's run identity as base checkpoints wrote them before both trainers shared
# one set of names; read so that such a checkpoint still resumes.
_RENAMED_RUN_KEYS = {"lr": "learning_rate", "grad_clip": "max_grad_norm"}
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the model


def model_config(preset: Preset, vocab_size: int, eos_token_id: int):
    """A transformers config for `preset`. Dropout is 0: short single-pass pre-training does not
    overfit, and no dropout keeps training deterministic for a given seed."""
    special = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if preset.architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=preset.max_positions, n_embd=preset.hidden_size,
            n_layer=preset.num_layers, n_head=preset.num_heads, n_inner=preset.intermediate_size,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            initializer_range=preset.init_std, **special,
        )
    if preset.architecture == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=preset.hidden_size, num_hidden_layers=preset.num_layers,
            num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
            intermediate_size=preset.intermediate_size, max_position_embeddings=preset.max_positions,
            tie_word_embeddings=True, attention_dropout=0.0, initializer_range=preset.init_std, **special,
        )
    raise ValueError(f"unknown architecture {preset.architecture!r}")


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _tokenizer_and_model(init_from: str | None, preset: Preset, train_texts: list[str],
                         resume: Checkpoint | None):
    """(tokenizer, model, parent fingerprint). From scratch: a new BPE (or the one an interrupted
    run saved: retraining it could give other ids than its weights know) and a new model drawn
    from the global RNG. Continued: the parent's tokenizer and weights, in float32."""
    if init_from is not None:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(init_from, local_files_only=True))
        model = AutoModelForCausalLM.from_pretrained(init_from, local_files_only=True, dtype=torch.float32)
        return tokenizer, model, compute_fingerprint(model)
    if resume is not None and resume.state.get("tokenizer"):
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(
            str(resume.path / _CKPT_TOKENIZER), local_files_only=True))
    else:
        tokenizer = train_bytelevel_bpe(train_texts, vocab_size=preset.vocab_size)
    model = AutoModelForCausalLM.from_config(model_config(preset, len(tokenizer), tokenizer.eos_token_id))
    return tokenizer, model, None


def configure_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as nanoGPT builds it: decay the matrices (weights, embeddings), not biases and norm
    gains; beta2 0.95 for short runs at a high learning rate."""
    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------- the data


def pack_blocks(tokenizer, texts: list[str], block_len: int) -> torch.Tensor:
    """Tokenize, end every document with EOS, concatenate, cut into `[N, block_len]` (the tail that
    does not fill a block is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 1024):  # batched: the fast tokenizer encodes in parallel
        for seq in tokenizer(texts[start : start + 1024], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
    n = len(ids) // block_len
    return torch.tensor(ids[: n * block_len], dtype=torch.long).view(n, block_len)


class BlockSampler:
    """Which training blocks each step takes: every epoch a fresh random order, drawn from a
    generator of its own (seeded with the run's seed), so the data order does not depend on the
    init; a batch that crosses an epoch boundary takes the rest of one order and the start of the
    next."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_blocks, generator=self.generator)
        self.cursor, self.epoch = 0, 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        take, taken = [], 0
        while taken < batch_size:
            if self.cursor == self.num_blocks:  # next epoch, fresh order
                self.order = torch.randperm(self.num_blocks, generator=self.generator)
                self.cursor, self.epoch = 0, self.epoch + 1
            n = min(batch_size - taken, self.num_blocks - self.cursor)
            take.append(self.order[self.cursor : self.cursor + n])
            self.cursor, taken = self.cursor + n, taken + n
        return torch.cat(take)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data.order": self.order.contiguous(), "rng.data": self.generator.get_state()}

    def restore(self, tensors: dict[str, torch.Tensor], cursor: int, epoch: int) -> None:
        self.order = tensors["data.order"]
        self.generator.set_state(tensors["rng.data"])
        self.cursor, self.epoch = cursor, epoch


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int, device, autocast) -> float:
    """Mean next-token loss per predicted token over the validation blocks."""
    if len(blocks) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with autocast():
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]  # HF shifts labels: one fewer target per row
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------- one run


class CheckpointMismatchError(ValueError):
    """`train_base` found a checkpoint written for other data or hyperparameters."""


@dataclass
class BaseTrainResult:
    path: str | None  # None when cancelled (nothing is written)
    fingerprint: str | None
    metrics: dict
    steps: int
    cancelled: bool
    meta: dict = field(default_factory=dict)


@dataclass
class _Plan:
    """Every hyperparameter of one run, resolved: the config's value, else the preset's. Its field
    names are those of `base_meta.json`'s "hyperparameters"."""

    batch_size: int
    learning_rate: float
    max_seq_len: int
    steps: int
    warmup_steps: int


@dataclass
class _RunState:
    """What a checkpoint carries besides tensors (the JSON half), and what the loop updates."""

    step: int = 0
    trained_tokens: int = 0
    train_loss: float = float("nan")
    valid_loss: float = float("nan")
    initial_valid_loss: float = float("nan")
    eval_s: float = 0.0  # how long the first evaluation took: time kept back for the last one
    resumed_from: int | None = None


def _plan(config: BaseTrainingConfig, preset: Preset, max_seq_len: int, num_blocks: int) -> _Plan:
    batch_size = config.batch_size or preset.batch_size
    if config.steps is not None:
        steps = config.steps
    elif config.n_epochs is not None:
        steps = math.ceil(config.n_epochs * num_blocks / batch_size)
    else:
        steps = preset.steps
    return _Plan(batch_size, config.learning_rate or preset.learning_rate, max_seq_len, steps,
                 config.warmup_steps(steps))


@dataclass
class _Corpus:
    """The run's texts and the blocks of tokens it trains and validates on."""

    name: str
    train_texts: list[str]
    valid_texts: list[str]
    train_blocks: torch.Tensor  # [N, max_seq_len]
    valid_blocks: torch.Tensor  # at most config.max_eval_blocks of them

    @classmethod
    def pack(cls, name, tokenizer, train_texts, valid_texts, config: BaseTrainingConfig, preset: Preset, model):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; every training document must end with one")
        seq_len = min(config.max_seq_len or preset.max_seq_len, ModelGeometry.of(model.config).max_positions)
        train_blocks = pack_blocks(tokenizer, train_texts, seq_len)
        valid_blocks = pack_blocks(tokenizer, valid_texts, seq_len)[: config.max_eval_blocks]
        if len(train_blocks) == 0:
            raise ValueError(f"the training texts do not fill one block of {seq_len} tokens")
        return cls(name, train_texts, valid_texts, train_blocks, valid_blocks)

    def summary(self) -> dict:
        return {"name": self.name, "train_documents": len(self.train_texts), "valid_documents": len(self.valid_texts),
                "train_chars": sum(map(len, self.train_texts)), "train_tokens": int(self.train_blocks.numel()),
                "valid_tokens_evaluated": int(self.valid_blocks.numel())}


def _run_identity(architecture, size, seed, parent_fingerprint, plan: _Plan, config: BaseTrainingConfig,
                  vocab_size: int, corpus: _Corpus) -> dict:
    """Everything that decides the weights: a checkpoint of another run must not be continued."""
    return {
        "architecture": architecture, "size": size, "seed": seed, "parent_fingerprint": parent_fingerprint,
        "total_steps": plan.steps, "batch_size": plan.batch_size, "learning_rate": plan.learning_rate,
        "max_seq_len": plan.max_seq_len, "warmup_steps": plan.warmup_steps, "min_lr_ratio": config.min_lr_ratio,
        "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm, "vocab_size": vocab_size,
        "train_sha256": _tensor_sha256(corpus.train_blocks), "valid_sha256": _tensor_sha256(corpus.valid_blocks),
    }


def _start(resume: Checkpoint | None, identity: dict, model, optimizer, data: BlockSampler, device, evaluate,
           callbacks: TrainingCallbacks) -> _RunState:
    """Where the run starts: step 0 after an initial evaluation, or where the checkpoint left off."""
    if resume is not None:
        run = _restore(resume, identity, model, optimizer, data, device)
        log.info("resuming base training from %s (step %d of %d)", resume.path, run.step, identity["total_steps"])
        return run
    run = _RunState()
    t_eval = time.time()
    run.initial_valid_loss = run.valid_loss = evaluate()
    callbacks.on_eval(0, _eval_metrics(run.valid_loss))
    run.eval_s = time.time() - t_eval
    return run


def _train_step(model, optimizer, batch: torch.Tensor, learning_rate: float, autocast, max_grad_norm: float) -> float:
    """One optimizer step on one batch of blocks; returns its loss."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    with autocast():
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_base(
    out_dir: str,
    train_texts: list[str],
    valid_texts: list[str] | None = None,
    *,
    init_from: str | None = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    size: str = DEFAULT_SIZE,
    config: BaseTrainingConfig | None = None,
    seed: int = 0,
    callbacks: TrainingCallbacks | None = None,
    device: str | torch.device | None = None,
    corpus_name: str = "custom",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
) -> BaseTrainResult:
    """Full-parameter causal-LM training; writes a new base directory at `out_dir`.

    From scratch (`init_from=None`): a byte-level BPE on `train_texts`, then a randomly initialised
    `PRESETS[(architecture, size)]` model. Continued (`init_from=dir`): that base and its tokenizer
    (kept, so token ids stay valid); `architecture` and `size` then only pick default
    hyperparameters. `steps=0` writes the initial model untouched. Deterministic for a seed on a
    machine (fixed step count, no dropout, seeded init and data order). Cancelling via
    `callbacks.should_stop()` writes no base.

    Checkpoints (`checkpoint_dir/step-00000123/`): every `checkpoint_every` steps (None: about 10
    per run, at least one every 200 steps; 0: only when cancelled), the last `keep_checkpoints`
    kept. A run finding a checkpoint there resumes from the newest and ends with the weights of an
    uninterrupted run; one written for other data or hyperparameters raises CheckpointMismatchError.
    """
    callbacks = callbacks or TrainingCallbacks()
    config = config or BaseTrainingConfig()
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[(architecture, size)]
    if valid_texts is None:
        train_texts, valid_texts = split_train_valid(list(train_texts), config.valid_fraction)
    t_start = time.time()
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = newest_checkpoint(ckpt_root, CHECKPOINT_KIND, _check_tokenizer) if ckpt_root is not None else None

    # -- the model, the data, the plan, the optimizer
    torch.manual_seed(seed)  # a new model's init
    tokenizer, model, parent_fingerprint = _tokenizer_and_model(init_from, preset, train_texts, resume)
    model.to(device).train()
    model.requires_grad_(True)
    corpus = _Corpus.pack(corpus_name, tokenizer, train_texts, valid_texts, config, preset, model)
    plan = _plan(config, preset, corpus.train_blocks.shape[1], len(corpus.train_blocks))
    if checkpoint_every is None:  # ~10 per run, so a lost worker costs at most a tenth of it
        checkpoint_every = max(1, min(200, math.ceil(plan.steps / 10)))
    prep_s = time.time() - t_start
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_bf16)
    optimizer = configure_optimizer(model, plan.learning_rate, config.weight_decay)
    data = BlockSampler(len(corpus.train_blocks), seed)
    identity = _run_identity(architecture, size, seed, parent_fingerprint, plan, config, len(tokenizer), corpus)
    evaluate = partial(validation_loss, model, corpus.valid_blocks, plan.batch_size, device, autocast)
    run = _start(resume, identity, model, optimizer, data, device, evaluate, callbacks)
    save = partial(_save, ckpt_root, run, model, optimizer, data, tokenizer if init_from is None else None,
                   identity, device, keep_checkpoints, callbacks)

    # -- the loop
    reserve_s = 2 * run.eval_s + 5.0  # kept for the final evaluation and the save
    start_step, start_tokens, last_saved = run.step, run.trained_tokens, run.step
    cancelled = out_of_time = False
    t_train = time.time()
    while run.step < plan.steps:
        if callbacks.should_stop():
            cancelled = True
            break
        if _out_of_time(config.time_budget_s, t_start, t_train, run.step - start_step, reserve_s):
            out_of_time = True
            break
        batch = corpus.train_blocks[data.next_batch(plan.batch_size)].to(device)
        rate = learning_rate_at(run.step, plan.steps, plan.warmup_steps, plan.learning_rate, config.min_lr_ratio)
        run.train_loss = _train_step(model, optimizer, batch, rate, autocast, config.max_grad_norm)
        run.step += 1
        run.trained_tokens += batch.numel()
        more_to_come = run.step < plan.steps
        if config.eval_every and run.step % config.eval_every == 0 and more_to_come:
            run.valid_loss = evaluate()
            callbacks.on_eval(run.step, _eval_metrics(run.valid_loss))
        if ckpt_root is not None and checkpoint_every and run.step % checkpoint_every == 0 and more_to_come:
            save()
            last_saved = run.step
        callbacks.on_progress(_progress(run, plan, data.epoch, t_train, start_step, start_tokens))
    train_s = time.time() - t_train

    # -- the end: nothing written when cancelled, else the final evaluation and the new base
    metrics = {"train_loss": run.train_loss, "initial_valid_loss": run.initial_valid_loss,
               "trained_tokens": run.trained_tokens, "stopped_by_time_budget": out_of_time}
    if cancelled:
        # a cancel may be a lost worker handing the job over: keep the progress since the last save
        if ckpt_root is not None and run.step > last_saved:
            save()
        return BaseTrainResult(None, None, metrics, run.step, True)
    valid_loss = evaluate()
    metrics.update(_eval_metrics(valid_loss))
    callbacks.on_eval(run.step, _eval_metrics(valid_loss))
    model.eval().to("cpu")
    fingerprint = compute_fingerprint(model)
    timing = {"prepare": round(prep_s, 1), "train": round(train_s, 1), "total": round(time.time() - t_start, 1),
              "tokens_per_s": round(run.trained_tokens / max(train_s, 1e-9), 1)}
    meta = _base_meta(model, tokenizer, fingerprint, preset=None if init_from is not None else preset,
                      init_from=init_from, parent_fingerprint=parent_fingerprint, seed=seed, config=config, plan=plan,
                      corpus=corpus, run=run, metrics=metrics, timing=timing, device=device)
    _save_atomically(out_dir, model, tokenizer, meta)
    return BaseTrainResult(str(out_dir), fingerprint, metrics, run.step, False, meta)


def _base_meta(model, tokenizer, fingerprint: str, *, preset: Preset | None, init_from: str | None,
               parent_fingerprint: str | None, seed: int, config: BaseTrainingConfig, plan: _Plan, corpus: _Corpus,
               run: _RunState, metrics: dict, timing: dict, device) -> dict:
    """`base_meta.json`: where the base came from and how it was trained (`preset` of a new base)."""
    return {
        "fingerprint": fingerprint, "architecture": model.config.model_type,
        "preset": None if preset is None else asdict(preset),
        "init_from": None if init_from is None else {"path": str(init_from), "fingerprint": parent_fingerprint},
        "seed": seed, "parameters": count_parameters(model), "vocab_size": len(tokenizer), "device": str(device),
        "hyperparameters": {**asdict(config), **asdict(plan)},
        "corpus": corpus.summary(), "steps": run.step, "planned_steps": plan.steps,
        "resumed_from_step": run.resumed_from,
        "passes_over_corpus": round(run.trained_tokens / max(1, corpus.train_blocks.numel()), 3),
        "metrics": metrics, "timing_s": timing,
    }


def _out_of_time(budget_s: float | None, t_start: float, t_train: float, steps_run: int, reserve_s: float) -> bool:
    """Whether one more step (at this run's mean step time) and the reserve would overrun the budget."""
    if budget_s is None or steps_run == 0:
        return False
    step_s = (time.time() - t_train) / steps_run
    return time.time() - t_start + step_s + reserve_s > budget_s


def _progress(run: _RunState, plan: _Plan, epoch: int, t_train: float, start_step: int, start_tokens: int):
    elapsed = time.time() - t_train
    rate = (run.trained_tokens - start_tokens) / max(elapsed, 1e-9)  # this run's speed
    return Progress(
        step=run.step, total_steps=plan.steps, epoch=epoch, train_loss=run.train_loss,
        valid_loss=run.valid_loss, tokens_per_s=rate, eta_s=elapsed / (run.step - start_step) * (plan.steps - run.step),
        trained_tokens=run.trained_tokens,
    )


def _eval_metrics(valid_loss: float) -> dict:
    return {"valid_loss": valid_loss, "valid_perplexity": _ppl(valid_loss)}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if loss == loss else float("nan")


# --------------------------------------------------------------------------- checkpoints


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (safetensors refuses shared storage); the dropped
    names are restored through the tie when the kept name is loaded."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _check_tokenizer(path: Path, state: dict) -> None:
    if state.get("tokenizer") and not (path / _CKPT_TOKENIZER / "tokenizer.json").is_file():
        raise ValueError("its tokenizer is missing")


def _save(root: Path, run: _RunState, model, optimizer, data: BlockSampler, tokenizer, identity: dict, device,
          keep: int, callbacks: TrainingCallbacks) -> None:
    """A checkpoint of the run at its current step: weights, AdamW moments, data order and RNG
    states as tensors, counters and identity as JSON, and for a from-scratch run its BPE (a few
    hundred KB; in every checkpoint, so each one stands alone)."""
    opt_tensors, param_groups = optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in _unique_state(model).items()}
    tensors.update(opt_tensors)
    tensors.update(data.tensors())
    tensors.update(rng_tensors(device))
    state = {
        "run": identity, "step": run.step, "epoch": data.epoch, "cursor": data.cursor,
        "trained_tokens": run.trained_tokens, "train_loss": to_json_float(run.train_loss),
        "valid_loss": to_json_float(run.valid_loss), "initial_valid_loss": to_json_float(run.initial_valid_loss),
        "eval_s": run.eval_s, "tokenizer": tokenizer is not None, "optimizer": {"param_groups": param_groups},
    }
    write_tokenizer = None if tokenizer is None else (lambda tmp: tokenizer.save_pretrained(str(tmp / _CKPT_TOKENIZER)))
    path = save_checkpoint(root, run.step, CHECKPOINT_KIND, tensors, state, keep, write_tokenizer)
    callbacks.on_checkpoint(run.step, {"step": run.step, "train_loss": run.train_loss, "valid_loss": run.valid_loss,
                                       "trained_tokens": run.trained_tokens, "checkpoint_path": str(path)})


def _restore(resume: Checkpoint, identity: dict, model, optimizer, data: BlockSampler, device) -> _RunState:
    """Weights, AdamW state, data order and RNG from `resume`, after checking it is this run's."""
    st = resume.state
    saved_identity = {_RENAMED_RUN_KEYS.get(k, k): v for k, v in st["run"].items()}
    if saved_identity != identity:
        differ = sorted(k for k in identity if saved_identity.get(k) != identity[k])
        raise CheckpointMismatchError(
            f"the checkpoint in {resume.path.parent} was written for another run (differs in {differ})")
    weights = {k[len("model."):]: v for k, v in resume.tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(model.state_dict()) - set(_unique_state(model))
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint weights do not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    restore_optimizer(optimizer, resume.tensors, st["optimizer"]["param_groups"])
    restore_rng(resume.tensors, device)
    data.restore(resume.tensors, st["cursor"], st["epoch"])
    return _RunState(step=st["step"], trained_tokens=st["trained_tokens"],
                     train_loss=from_json_float(st["train_loss"]), valid_loss=from_json_float(st["valid_loss"]),
                     initial_valid_loss=from_json_float(st["initial_valid_loss"]), eval_s=st["eval_s"],
                     resumed_from=st["step"])


def _save_atomically(out_dir: str, model, tokenizer, meta: dict) -> None:
    """Write into a temporary sibling directory, then rename: readers never see half a base."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)  # an empty placeholder may be replaced
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- entry points


def create_base(
    out_dir: str,
    architecture: str,
    size: str,
    corpus_texts: list[str],
    seed: int = 0,
    config: BaseTrainingConfig | None = None,
    callbacks: TrainingCallbacks | None = None,
    **kwargs,
) -> BaseTrainResult:
    """A new base from scratch on `corpus_texts` (tokenizer included). `steps=0`: untrained."""
    return train_base(out_dir, corpus_texts, init_from=None, architecture=architecture, size=size,
                      config=config, seed=seed, callbacks=callbacks, **kwargs)


DEFAULT_BUILD_BUDGET_S = 300.0


def build_default_base(
    out_dir: str, seed: int = 0, callbacks: TrainingCallbacks | None = None,
    config: BaseTrainingConfig | None = None, budget_s: float | None = DEFAULT_BUILD_BUDGET_S,
    checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
    device: str | torch.device | None = None,
) -> BaseTrainResult:
    """The service's first-start base: stdlib corpus -> 8k BPE -> `(DEFAULT_ARCHITECTURE, "default")`.

    The preset's fixed step count makes the build deterministic for a seed; `budget_s` (whole call,
    corpus included) is a safety net for slow or busy machines, which then stop training early (the
    base_meta.json says so). `config` overrides the preset's hyperparameters (tests use a few steps).

    With `checkpoint_dir`, the build checkpoints like any `train_base` run (`checkpoint_every`, None:
    about 10 per build) and a build killed midway resumes from the newest checkpoint there, ending
    with the same fingerprint as an uninterrupted one. `budget_s` counts this call only, so a resumed
    build has the whole budget for its remaining steps. Checkpoints of another build (another
    Python's standard library, another step count or seed) are deleted and the build starts over.
    The caller removes `checkpoint_dir` once the base is in place.

    How long the build takes and why the default preset is shaped so: docs/BENCHMARKS.md,
    "Training defaults".
    """
    t0 = time.time()
    texts = default_corpus()
    train, valid = split_train_valid(texts)
    config = config or BaseTrainingConfig()

    def attempt() -> BaseTrainResult:
        cfg = config
        if budget_s is not None and config.time_budget_s is None:
            cfg = replace(config, time_budget_s=budget_s - (time.time() - t0))
        return train_base(out_dir, train, valid, init_from=None, architecture=DEFAULT_ARCHITECTURE,
                          size=DEFAULT_SIZE, config=cfg, seed=seed, callbacks=callbacks,
                          corpus_name="python-stdlib-docs", checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every, device=device)

    try:
        return attempt()
    except CheckpointMismatchError as e:
        if checkpoint_dir is None:  # cannot happen: no checkpoint is read without a directory
            raise
        log.warning("discarding the default base build's checkpoints: %s; starting over", e)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return attempt()
