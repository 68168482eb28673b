"""Base models for serving: load any local causal LM, frozen, and fingerprint it.

- `load_base(path)` loads a Hugging Face causal-LM directory (GPT-2, Llama, Qwen2, ...) frozen and in
  eval mode, with a left-padding tokenizer whose pad token is set, its geometry and its fingerprint.
  `resolve_device` and `resolve_serving_dtype` turn the service's device and dtype settings into
  torch's, with a clear error for a device the machine lacks.
- `compute_fingerprint(model)` hashes the canonical config and every weight. Adapters record it, so
  a prefix is never applied to a base it was not trained on.

Creating a base, or training one further, is `app/ml/pretrain.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.ml.kvcache import ModelGeometry


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
