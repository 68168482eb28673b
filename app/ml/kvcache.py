"""How prefixes enter the frozen model: as past key/values in a transformers cache.

One rule, used by training, scoring and generation alike, so that they agree:
- every row's prefix occupies the *last* P_i of P_max cache slots (left padding of the prefix);
- the attention mask is `[prefix slots | token slots]`, 0 for empty prefix slots and pad tokens;
- position ids are `cumsum(mask) - 1` over that whole mask, so a row's first real token sits at
  position P_i, exactly as it does when the row runs alone (and as in PEFT).

Two cache flavours:
- `FrozenPrefixCache` (training and scoring): `update` returns `cat(prefix, new)` and stores
  nothing, so a gradient-checkpointing recompute sees the same keys as the first pass. PEFT's
  prefix tuning breaks with gradient checkpointing precisely because its cache grows on recompute.
- `GenerationCache` (generation): pre-filled with the prefixes, then grows by one token per step.
  Its layers append into spare capacity: a `DynamicLayer` re-concatenates the whole cache every
  step, a large share of a decode step (bench.mixed_prefix; docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [heads, P, head_dim]


@dataclass(frozen=True)
class ModelGeometry:
    """What a prefix must match: layers, key/value heads and head size of the base."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int

    @classmethod
    def of(cls, config) -> ModelGeometry:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
        return cls(int(layers), int(kv_heads), int(head_dim), int(hidden), int(max_pos))


class _FrozenPrefixLayer(DynamicLayer):
    """A cache layer that prepends a fixed prefix and never grows."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class FrozenPrefixCache(DynamicCache):
    def __init__(self, batch_kv: KV):
        super().__init__()
        self.layers = [_FrozenPrefixLayer(k, v) for k, v in batch_kv]


def batch_prefixes(
    prefixes: list[KV | None], geometry: ModelGeometry, dtype: torch.dtype, device
) -> tuple[KV, torch.Tensor]:
    """Stack per-row prefixes (or None) into per-layer `[B, heads, P_max, hd]` tensors.

    Returns the batched key/values and the `[B, P_max]` prefix mask (1 where a row has a slot).
    Each row's prefix is right-aligned, so its last slot sits next to its first token.
    """
    lengths = [0 if p is None else p[0][0].shape[1] for p in prefixes]
    B, P_max = len(prefixes), max(lengths) if lengths else 0
    mask = torch.zeros(B, P_max, dtype=torch.long, device=device)
    out: KV = []
    shape = (B, geometry.num_kv_heads, P_max, geometry.head_dim)
    same = P_max > 0 and all(p is prefixes[0] for p in prefixes)
    full = P_max > 0 and all(n == P_max for n in lengths)
    for layer in range(geometry.num_layers):
        if same:  # one shared prefix: expand, no copy, and gradients flow
            k, v = prefixes[0][layer]
            out.append((k.to(dtype).unsqueeze(0).expand(shape), v.to(dtype).unsqueeze(0).expand(shape)))
            continue
        if full:  # every row has a prefix of length P_max: one stack per layer, not a copy per row
            out.append((torch.stack([p[layer][0] for p in prefixes]).to(device=device, dtype=dtype),
                        torch.stack([p[layer][1] for p in prefixes]).to(device=device, dtype=dtype)))
            continue
        ks = torch.zeros(shape, dtype=dtype, device=device)
        vs = torch.zeros(shape, dtype=dtype, device=device)
        for row, p in enumerate(prefixes):
            if p is None:
                continue
            k, v = p[layer]
            ks[row, :, P_max - k.shape[1] :] = k.to(dtype)
            vs[row, :, P_max - v.shape[1] :] = v.to(dtype)
        out.append((ks, vs))
    for row, n in enumerate(lengths):
        if n:
            mask[row, P_max - n :] = 1
    return out, mask


def positions_from_mask(full_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position ids of the last `num_tokens` slots: count of real slots before each, pads at 0."""
    pos = full_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -num_tokens:]


def _with_capacity(current: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
    # Uninitialised: slots past T are never read (the layer exposes views of the first T), and
    # zero-filling a 32-row buffer cost more than a decode step's vocabulary projection.
    buf = like.new_empty((*like.shape[:2], capacity, like.shape[3]))
    if current is not None:
        buf[:, :, : current.shape[2]] = current
    return buf


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare capacity instead of `torch.cat`.

    `keys`/`values` stay what every `DynamicLayer` caller expects, `[B, heads, T, hd]` tensors, but
    they are views of the first T slots of larger buffers. Code that replaces them (batch
    selection, trimming, merging rows) simply makes the next `update` adopt the new tensors into
    fresh buffers: one copy per change of rows instead of one per token.
    """

    def __init__(self, reserve: int = 0):
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.reserve = reserve  # slots the first buffer is sized for (the prompt that follows the prefix)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T, n = self.get_seq_length(), key_states.shape[-2]
        buf = self._key_buffer
        adopt = (
            buf is None
            or T + n > buf.shape[2]
            or buf.shape[0] != key_states.shape[0]
            # keys were replaced (rows selected, trimmed or merged) since the last update
            or (
                T > 0
                and (self.keys.data_ptr() != buf.data_ptr() or self.keys.shape != (*buf.shape[:2], T, buf.shape[3]))
            )
        )
        if adopt:
            needed = max(T + n, self.reserve if buf is None else 0)
            capacity = needed + max(64, needed // 2)  # geometric growth: O(1) amortised copies per token
            self._key_buffer = _with_capacity(self.keys if T else None, key_states, capacity)
            self._value_buffer = _with_capacity(self.values if T else None, value_states, capacity)
        self._key_buffer[:, :, T : T + n] = key_states
        self._value_buffer[:, :, T : T + n] = value_states
        self.keys = self._key_buffer[:, :, : T + n]
        self.values = self._value_buffer[:, :, : T + n]
        return self.keys, self.values


class GenerationCache(DynamicCache):
    """The decoding cache: `GrowingLayer`s, pre-filled with the batch's prefixes if any.

    `reserve`: the slots that prefix and prompt will take. The first buffers are sized from it, so
    that a prefill after the prefix and the first decode steps write into them without a copy."""

    def __init__(self, batch_kv: KV | None = None, reserve: int = 0):
        super().__init__()
        self.layer_class_to_replicate = partial(GrowingLayer, reserve)
        for i, (k, v) in enumerate(batch_kv or []):
            self.update(k, v, i)


_MASK_SUPPORT: dict[type, bool] = {}


def keeps_logits_by_mask(model) -> bool:
    """Whether `model` takes a boolean [B, L] `logits_to_keep` (transformers' `slice_logits_to_keep`,
    which returns the kept positions flattened): the model's module slices with it, and the helper
    of the installed transformers knows boolean masks. Older versions keep the last-k path."""
    cls = type(model)
    if cls not in _MASK_SUPPORT:
        import sys

        fn = getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None)
        ok = False
        if fn is not None:
            try:
                ok = tuple(fn(torch.zeros(1, 2, 1), torch.tensor([[False, True]])).shape) == (1, 1)
            except Exception:  # an int/1-D-only helper
                ok = False
        _MASK_SUPPORT[cls] = ok
    return _MASK_SUPPORT[cls]
