"""Base models: load any local causal LM, fingerprint it, and create or continue-train one offline.

- `load_base(path)` loads a Hugging Face causal-LM directory (GPT-2, Llama, Qwen2, ...) frozen and in
  eval mode, with a left-padding tokenizer whose pad token is set, and its fingerprint.
  `resolve_device` and `resolve_serving_dtype` turn the service's device and dtype settings into
  torch's, with a clear error for a device the machine lacks.
- `compute_fingerprint(model)` hashes the canonical config and every weight. Adapters record it, so
  a prefix is never applied to a base it was not trained on.
- `train_base(...)` is full-parameter causal-LM training, from scratch (it trains the byte-level BPE
  tokenizer first) or continued from an existing base (its tokenizer is kept). It writes a new
  `from_pretrained`-loadable directory atomically, with `base_meta.json`. Given a `checkpoint_dir`,
  it checkpoints (weights, AdamW state, data order, RNG, its BPE; safetensors + JSON) and resumes
  from the newest checkpoint there, ending bit-identical to an uninterrupted run.
- `build_default_base(out_dir)` is the one call the service makes on first start: stdlib corpus ->
  8k BPE -> the `default` preset -> about four minutes of training on 2 CPU cores; given a
  `checkpoint_dir`, a build killed midway resumes there.

Presets come in GPT-2 style (learned positions, LayerNorm, GELU MLP, multi-head attention) and
Llama style (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention), keyed
`(architecture, size)`: `tiny` for tests, `default` for the CPU build, `small` and `medium` for GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from app.ml.callbacks import Progress, TrainingCallbacks
from app.ml.corpus import default_corpus, split_train_valid
from app.ml.kvcache import ModelGeometry
from app.ml.tokenizer import train_bytelevel_bpe

META_FILE = "base_meta.json"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading


@dataclass
class Base:
    """One frozen base model and everything the engine needs to know about it."""

    model: torch.nn.Module
    tokenizer: object  # a PreTrainedTokenizerBase: pad token set, left padding
    fingerprint: str
    geometry: ModelGeometry
    path: str
    device: torch.device


def prepare_tokenizer(tokenizer):
    """Left padding (generation appends on the right) and a pad token (= EOS when missing)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


SERVING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """A device setting as a torch device: "auto" is the first CUDA device when torch sees one,
    else the CPU; "cpu", "cuda" and "cuda:N" are taken as given. Raises ValueError, naming the
    setting, for anything else and for a CUDA device this machine lacks (rather than failing at
    the first tensor moved there)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch sees no CUDA device on this machine "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_serving_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype to serve in (None: as stored, float32 for bases built here). "auto" is bfloat16
    on a GPU that supports it (float16 on older ones) and the stored dtype on the CPU: bfloat16
    matmuls are fast only on CPUs with AMX, and CPU results then match training's float32."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in SERVING_DTYPES:
        raise ValueError(f"serving dtype {name!r} is not one of auto, {', '.join(SERVING_DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ValueError("serving dtype float16 needs a GPU: use float32 or bfloat16 on the CPU")
    return SERVING_DTYPES[name]


def load_base(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Base:
    """Load a local causal-LM directory, frozen, in eval mode.

    The fingerprint is taken from the weights as stored, before any `dtype` cast, so the same
    directory has the same fingerprint whether it is served in float32 or bfloat16."""
    path = str(path)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
    fingerprint = compute_fingerprint(model)
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    model.requires_grad_(False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Base(model, tokenizer, fingerprint, ModelGeometry.of(model.config), path, device)


# Keys that change with the library version, the load path or the load dtype, not the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                         "_attn_implementation", "_attn_implementation_autoset", "use_cache"}


def canonical_config(config) -> dict:
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in _VOLATILE_CONFIG_KEYS}


def compute_fingerprint(model: torch.nn.Module) -> str:
    """`sha256:` + 16 hex digits over the canonical config and every tensor of the state dict
    (sorted by name; name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(canonical_config(config), sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # view as bytes (works for bfloat16 too, which numpy cannot hold)
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


# --------------------------------------------------------------------------- presets


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
    lr: float
    steps: int
    # std of the normal init of every linear and embedding weight (transformers' initializer_range)
    init_std: float = 0.02


def _presets() -> dict[tuple[str, str], Preset]:
    p = {}
    # name: (hidden, layers, heads, kv_heads(llama), mlp(llama), positions, vocab, seq, batch, lr, steps)
    shapes = {
        "tiny": (64, 2, 4, 2, 172, 256, 2048, 64, 8, 3e-3, 20),
        # CPU build on 2 cores: ~3.5M (gpt2) / ~3.2M (llama) parameters, half of them the 8k
        # embedding; small enough that a few hundred thousand tokens pass in four minutes
        # Full multi-head attention (4 KV heads, not 2): a prefix lives in the KV heads, and with 2
        # the word -> label task stayed at 58% held-out exact match where 4 reached 100%.
        "default": (192, 4, 4, 4, 512, 512, 8192, 128, 8, 3e-3, 400),
        # GPU sizes: ~30M and ~120M parameters
        "small": (512, 8, 8, 4, 1376, 1024, 8192, 512, 32, 1e-3, 20_000),
        "medium": (768, 12, 12, 4, 2048, 2048, 32768, 1024, 32, 6e-4, 50_000),
    }
    for size, (d, n, h, kv, mlp, pos, vocab, seq, bs, lr, steps) in shapes.items():
        # The CPU default starts from a wider init than the usual 0.02. After its few hundred steps
        # a 0.02 start is still a near-bigram model whose last position barely carries the earlier
        # words, so no prefix can make a label depend on one; 0.1 reaches the same perplexity and
        # keeps content-mixing attention that a prefix can steer (see build_default_base).
        init_std = 0.1 if size == "default" else 0.02
        p[("gpt2", size)] = Preset("gpt2", size, d, n, h, h, 4 * d, pos, vocab, seq, bs, lr, steps, init_std)
        p[("llama", size)] = Preset("llama", size, d, n, h, kv, mlp, pos, vocab, seq, bs, lr, steps, init_std)
    return p


PRESETS: dict[tuple[str, str], Preset] = _presets()
# Chosen by measurement; see build_default_base.
DEFAULT_ARCHITECTURE = "llama"


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


# --------------------------------------------------------------------------- training


@dataclass
class BaseTrainingConfig:
    """Hyperparameters of full-parameter LM training. None fields take the preset's value."""

    steps: int | None = None  # optimizer steps; wins over epochs
    epochs: float | None = None  # passes over the packed training blocks, when steps is None
    batch_size: int | None = None
    lr: float | None = None
    max_seq_len: int | None = None
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate only before and after training
    max_eval_blocks: int = 64  # cap on validation blocks per evaluation (CPU time)
    valid_fraction: float = 0.02  # when no validation texts are given
    # Wall-clock cap for the whole call (tokenizer, packing, training, final eval, save). Training
    # stops early when the next step would not fit; the run is then no longer deterministic
    # (`stopped_by_time_budget` in the metadata says so). None: run all steps.
    time_budget_s: float | None = None


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


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `lr * min_ratio`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # nanoGPT: decay matrices (weights, embeddings), not biases and norm gains
    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_base(
    out_dir: str,
    train_texts: list[str],
    valid_texts: list[str] | None = None,
    *,
    init_from: str | None = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    size: str = "default",
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

    From scratch (`init_from=None`): trains a byte-level BPE on `train_texts`, then a randomly
    initialised `PRESETS[(architecture, size)]` model. Continued (`init_from=dir`): loads that base
    and its tokenizer (kept unchanged, so token ids stay valid); `architecture` and `size` then
    only pick default hyperparameters. `steps=0` writes the initial model untouched.

    Deterministic for a given seed on a given machine (fixed step count, no dropout, seeded init
    and data order). Cancelling via `callbacks.should_stop()` writes no base.

    Checkpoints (`checkpoint_dir/step-00000123/`, see `_save_checkpoint`): every `checkpoint_every`
    steps (None: about 10 per run, at least one every 200 steps; 0: only when cancelled), the last
    `keep_checkpoints` kept. If `checkpoint_dir` already holds a complete checkpoint, training
    resumes from the newest one and ends with the same weights as an uninterrupted run; a
    checkpoint written for other data or hyperparameters is refused (CheckpointMismatchError, a
    ValueError).
    """
    callbacks = callbacks or TrainingCallbacks()
    config = config or BaseTrainingConfig()
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[(architecture, size)]
    seq_len = config.max_seq_len or preset.max_seq_len
    batch_size = config.batch_size or preset.batch_size
    lr = config.lr or preset.lr
    if valid_texts is None:
        train_texts, valid_texts = split_train_valid(list(train_texts), config.valid_fraction)
    t_start = time.time()
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = _load_newest_checkpoint(ckpt_root) if ckpt_root is not None else None

    torch.manual_seed(seed)
    if init_from is None:
        if resume is not None and resume["state"].get("tokenizer"):
            # the BPE of the interrupted run: retraining could give other ids than its weights know
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(
                str(resume["path"] / _CKPT_TOKENIZER), local_files_only=True))
        else:
            tokenizer = train_bytelevel_bpe(train_texts, vocab_size=preset.vocab_size)
        model = AutoModelForCausalLM.from_config(model_config(preset, len(tokenizer), tokenizer.eos_token_id))
        parent_fingerprint = None
    else:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(init_from, local_files_only=True))
        model = AutoModelForCausalLM.from_pretrained(init_from, local_files_only=True, dtype=torch.float32)
        parent_fingerprint = compute_fingerprint(model)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every training document must end with one")
    max_positions = ModelGeometry.of(model.config).max_positions
    seq_len = min(seq_len, max_positions)
    model.to(device).train()
    model.requires_grad_(True)

    train_blocks = pack_blocks(tokenizer, train_texts, seq_len)
    valid_blocks = pack_blocks(tokenizer, valid_texts, seq_len)[: config.max_eval_blocks]
    if len(train_blocks) == 0:
        raise ValueError(f"the training texts do not fill one block of {seq_len} tokens")
    blocks_per_epoch = len(train_blocks)
    if config.steps is not None:
        total_steps = config.steps
    elif config.epochs is not None:
        total_steps = math.ceil(config.epochs * blocks_per_epoch / batch_size)
    else:
        total_steps = preset.steps
    warmup = max(1, int(config.warmup_fraction * total_steps))
    prep_s = time.time() - t_start

    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    optimizer = _optimizer(model, lr, config.weight_decay)
    generator = torch.Generator().manual_seed(seed)  # data order, independent of the init RNG
    order = torch.randperm(blocks_per_epoch, generator=generator)
    cursor, epoch = 0, 0
    if checkpoint_every is None:  # ~10 per run, so a lost worker costs at most a tenth of it
        checkpoint_every = max(1, min(200, math.ceil(total_steps / 10)))
    # everything that decides the weights: a checkpoint of another run must not be continued
    run_identity = {
        "architecture": architecture, "size": size, "seed": seed, "parent_fingerprint": parent_fingerprint,
        "total_steps": total_steps, "batch_size": batch_size, "lr": lr, "max_seq_len": seq_len,
        "warmup_steps": warmup, "min_lr_ratio": config.min_lr_ratio, "weight_decay": config.weight_decay,
        "grad_clip": config.grad_clip, "vocab_size": len(tokenizer),
        "train_sha256": _tensor_sha256(train_blocks), "valid_sha256": _tensor_sha256(valid_blocks),
    }

    trained_tokens, step, cancelled, out_of_time = 0, 0, False, False
    train_loss = float("nan")
    resumed_from = None
    if resume is None:
        t_eval = time.time()
        initial_valid = validation_loss(model, valid_blocks, batch_size, device, autocast)
        valid_loss = initial_valid
        callbacks.on_eval(0, {"valid_loss": valid_loss, "valid_perplexity": _ppl(valid_loss)})
        eval_s = time.time() - t_eval
    else:
        st = resume["state"]
        if st["run"] != run_identity:
            differ = sorted(k for k in run_identity if st["run"].get(k) != run_identity[k])
            raise CheckpointMismatchError(
                f"the checkpoint in {ckpt_root} was written for another run (differs in {differ})")
        order, generator_state = _restore_checkpoint(resume, model, optimizer, device)
        generator.set_state(generator_state)
        step, cursor, epoch = st["step"], st["cursor"], st["epoch"]
        trained_tokens = st["trained_tokens"]
        train_loss, valid_loss, initial_valid = (_from_json_float(st[k]) for k in
                                                 ("train_loss", "valid_loss", "initial_valid_loss"))
        eval_s, resumed_from = st["eval_s"], step
        log.info("resuming base training from %s (step %d of %d)", resume["path"], step, total_steps)
    # time kept for the final evaluation and the save, from how long the first evaluation took
    reserve_s = 2 * eval_s + 5.0
    start_step, start_tokens, last_saved = step, trained_tokens, step

    def save_checkpoint() -> None:
        path = _save_checkpoint(ckpt_root, step, model, optimizer, tokenizer if init_from is None else None, {
            "run": run_identity, "step": step, "epoch": epoch, "cursor": cursor,
            "trained_tokens": trained_tokens, "train_loss": _to_json_float(train_loss),
            "valid_loss": _to_json_float(valid_loss), "initial_valid_loss": _to_json_float(initial_valid),
            "eval_s": eval_s,
        }, order, generator, device, keep_checkpoints)
        callbacks.on_checkpoint(step, {"step": step, "train_loss": train_loss, "valid_loss": valid_loss,
                                       "trained_tokens": trained_tokens, "checkpoint_path": str(path)})

    t_train = time.time()
    while step < total_steps:
        if callbacks.should_stop():
            cancelled = True
            break
        if config.time_budget_s is not None and step > start_step:
            step_s = (time.time() - t_train) / (step - start_step)
            if time.time() - t_start + step_s + reserve_s > config.time_budget_s:
                out_of_time = True
                break
        take, taken = [], 0
        while taken < batch_size:
            if cursor == blocks_per_epoch:  # next epoch, fresh order
                order = torch.randperm(blocks_per_epoch, generator=generator)
                cursor, epoch = 0, epoch + 1
            n = min(batch_size - taken, blocks_per_epoch - cursor)
            take.append(order[cursor : cursor + n])
            cursor, taken = cursor + n, taken + n
        batch = train_blocks[torch.cat(take)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup, lr, config.min_lr_ratio)
        with autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        trained_tokens += batch.numel()
        train_loss = loss.item()
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            valid_loss = validation_loss(model, valid_blocks, batch_size, device, autocast)
            callbacks.on_eval(step, {"valid_loss": valid_loss, "valid_perplexity": _ppl(valid_loss)})
        if ckpt_root is not None and checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            save_checkpoint()
            last_saved = step
        elapsed = time.time() - t_train
        run_steps = step - start_step
        rate = (trained_tokens - start_tokens) / max(elapsed, 1e-9)  # this run's speed
        callbacks.on_progress(Progress(
            step=step, total_steps=total_steps, epoch=epoch, train_loss=train_loss, valid_loss=valid_loss,
            tokens_per_s=rate, eta_s=elapsed / run_steps * (total_steps - step), trained_tokens=trained_tokens,
        ))
    train_s = time.time() - t_train

    metrics = {"train_loss": train_loss, "initial_valid_loss": initial_valid, "trained_tokens": trained_tokens,
               "stopped_by_time_budget": out_of_time}
    if cancelled:
        # a cancel may be a lost worker handing the job over: keep the progress since the last save
        if ckpt_root is not None and step > last_saved:
            save_checkpoint()
        return BaseTrainResult(None, None, metrics, step, True)

    valid_loss = validation_loss(model, valid_blocks, batch_size, device, autocast)
    metrics.update(valid_loss=valid_loss, valid_perplexity=_ppl(valid_loss))
    callbacks.on_eval(step, {"valid_loss": valid_loss, "valid_perplexity": _ppl(valid_loss)})

    model.eval().to("cpu")
    fingerprint = compute_fingerprint(model)
    meta = {
        "fingerprint": fingerprint,
        "architecture": model.config.model_type,
        "preset": asdict(preset) if init_from is None else None,
        "init_from": None if init_from is None else {"path": str(init_from), "fingerprint": parent_fingerprint},
        "seed": seed,
        "parameters": count_parameters(model),
        "hyperparameters": {**asdict(config), "steps": total_steps, "batch_size": batch_size, "lr": lr,
                            "max_seq_len": seq_len, "warmup_steps": warmup},
        "corpus": {
            "name": corpus_name,
            "train_documents": len(train_texts), "valid_documents": len(valid_texts),
            "train_chars": sum(map(len, train_texts)),
            "train_tokens": int(train_blocks.numel()), "valid_tokens_evaluated": int(valid_blocks.numel()),
        },
        "steps": step,
        "planned_steps": total_steps,
        "resumed_from_step": resumed_from,
        "epochs": round(trained_tokens / max(1, train_blocks.numel()), 3),
        "metrics": metrics,
        "vocab_size": len(tokenizer),
        "timing_s": {"prepare": round(prep_s, 1), "train": round(train_s, 1),
                     "total": round(time.time() - t_start, 1),
                     "tokens_per_s": round(trained_tokens / max(train_s, 1e-9), 1)},
        "device": str(device),
    }
    _save_atomically(out_dir, model, tokenizer, meta)
    return BaseTrainResult(str(out_dir), fingerprint, metrics, step, False, meta)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if loss == loss else float("nan")


# --------------------------------------------------------------------------- checkpoints
# safetensors + JSON, written atomically, never pickled (a checkpoint may come from blob storage)

CHECKPOINT_FORMAT = "prefixd-base-train-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_TENSORS, _CKPT_STATE, _CKPT_TOKENIZER = "tensors.safetensors", "state.json", "tokenizer"
_CKPT_RE = re.compile(r"^step-(\d+)$")


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _to_json_float(x: float) -> float | None:
    return None if x != x else float(x)  # NaN is not JSON


def _from_json_float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


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


def _save_checkpoint(root: Path, step: int, model, optimizer, tokenizer, state: dict, order: torch.Tensor,
                     generator: torch.Generator, device, keep: int) -> Path:
    """`root/step-{step:08d}/`: `tensors.safetensors` (weights, AdamW moments, data order, RNG
    states), `state.json` (step, cursor, losses, optimizer hyperparameters, run identity) and, for
    a from-scratch run, `tokenizer/` (its BPE). Written into a temporary sibling and renamed, so a
    reader sees the whole checkpoint or none; the tokenizer rides in every checkpoint so each one
    stands alone (a few hundred KB beside the weights and moments)."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in _unique_state(model).items()}
    sd = optimizer.state_dict()
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"unexpected non-tensor optimizer state {k}")
            tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
    tensors["data.order"] = order.contiguous()
    tensors["rng.data"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state,
             "tokenizer": tokenizer is not None, "optimizer": {"param_groups": sd["param_groups"]}}
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / _CKPT_TENSORS))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / _CKPT_TOKENIZER))
        with open(tmp / _CKPT_STATE, "w") as f:  # last: a directory without it is incomplete
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step written again (a cancel right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _list_checkpoints(root)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir())


def _load_newest_checkpoint(root: Path) -> dict | None:
    """The newest readable checkpoint; a damaged or half-copied one (e.g. an interrupted blob
    download) falls back to the one before."""
    for _, path in reversed(_list_checkpoints(root)):
        try:
            with open(path / _CKPT_STATE) as f:
                state = json.load(f)
            if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
                raise ValueError("not a base training checkpoint of this version")
            if state.get("tokenizer") and not (path / _CKPT_TOKENIZER / "tokenizer.json").is_file():
                raise ValueError("its tokenizer is missing")
            return {"state": state, "tensors": load_file(str(path / _CKPT_TENSORS)), "path": path}
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.warning("skipping unreadable base checkpoint %s: %s", path, e)
    return None


def _restore_checkpoint(resume: dict, model, optimizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights, AdamW state and the global RNG from `resume`; returns (data order, data RNG state)."""
    tensors, state = resume["tensors"], resume["state"]
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(model.state_dict()) - set(_unique_state(model))
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint weights do not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    opt_state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    groups = state["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return tensors["data.order"], tensors["rng.data"]


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
    corpus included) is a safety net for slow or busy machines, which then stop training early.
    `config` overrides the preset's hyperparameters (tests use a few steps).

    With `checkpoint_dir`, the build checkpoints like any `train_base` run (`checkpoint_every`, None:
    about 10 per build) and a build killed midway resumes from the newest checkpoint there, ending
    with the same fingerprint as an uninterrupted one. `budget_s` counts this call only, so a resumed
    build has the whole budget for its remaining steps. Checkpoints of another build (another
    Python's standard library, another step count or seed) are deleted and the build starts over.
    The caller removes `checkpoint_dir` once the base is in place.

    Measured on the shared 2-core dev box (CPython 3.11 stdlib, torch 2.13 CPU):
    - corpus: 29,380 documents, 4.60M characters, 1.17M tokens with the 8k BPE (28,843 train /
      537 validation documents); building it costs ~16 s of one core, the BPE ~5 s, packing ~9 s;
    - `("llama", "default")`: 3.34M parameters (`("gpt2", "default")`: 3.45M); one step of
      8 x 128 tokens costs ~0.8 s of one core, so 400 steps (410k tokens, 0.35 epoch) take about
      3.5 minutes on two idle cores, about 4.5 minutes for the whole build (the 2-KV-head preset
      of session 1 built in 190 s on two idle cores);
    - validation perplexity at equal steps, same tokenizer and data order: Llama style 834 vs
      GPT-2 style 907 at step 100 (from 8,400 untrained); Llama style 578 at step 200. Llama style
      learns faster for the same compute, hence DEFAULT_ARCHITECTURE;
    - what a prefix can do with the base (word -> label task of `bench.defaults`, 6 labels, 180
      training pairs, the engine's default prefix training; held-out exact match):
      init std 0.02 and 2 KV heads (ppl 352): 13%; init 0.07: 65% (ppl 315); init 0.1: 58%
      (ppl 352); init 0.2: ppl 648; init 0.1 with 4 KV heads: 100% (ppl 349, this preset; 96.7% on
      the full benchmark). Training longer does not help: 800 steps at init 0.1 (ppl 224) fell to
      22%, and 900 steps at init 0.02 (ppl 247) carried less of the prompt to the last position.
      Few hundred steps of pre-training leave a near-bigram model; a wider init keeps the
      content-mixing attention a prefix steers, and every KV head is a prefix head.
    On a machine too busy for that, `budget_s` ends training early (see the base_meta.json).
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
                          size="default", config=cfg, seed=seed, callbacks=callbacks,
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
