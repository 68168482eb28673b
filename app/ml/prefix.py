"""The prefix module (Li & Liang 2021): a dataclass config and one small nn.Module.

A prefix is, for every layer of the frozen base, P key vectors and P value vectors for the model's
key/value heads (GQA aware: `num_kv_heads`, not the query heads). It is stored as one table of shape
`[P, num_layers * 2 * kv_dim]`, the same layout as PEFT's `prompt_embeddings`: along the second axis,
layer i's keys sit at block 2i and its values at block 2i+1.

Optionally the table is produced by a reparameterisation MLP
`Embedding(P, d) -> Linear(d, h) -> Tanh -> Linear(h, layers*2*kv_dim)`, which the paper found more
stable to train. `fold()` evaluates the MLP once and returns a plain table, which is what adapters
store and what serving uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class PrefixConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    projection_hidden_size: int = 512
    # width of the Embedding(P, d) in front of the MLP; the base's hidden size by convention
    embedding_dim: int = 0

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def table_width(self) -> int:
        return self.num_layers * 2 * self.kv_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrefixConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})

    def validate(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_virtual_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_projection and self.projection_hidden_size < 1:
            raise ValueError("projection_hidden_size must be >= 1")


class PrefixEncoder(nn.Module):
    """Holds one prefix. `forward()` returns the `[P, layers*2*kv_dim]` table."""

    def __init__(self, config: PrefixConfig):
        super().__init__()
        config.validate()
        self.config = config
        P, width = config.num_virtual_tokens, config.table_width
        if config.prefix_projection:
            d = config.embedding_dim or config.kv_dim
            self.embedding = nn.Embedding(P, d)
            self.mlp = nn.Sequential(
                nn.Linear(d, config.projection_hidden_size),
                nn.Tanh(),
                nn.Linear(config.projection_hidden_size, width),
            )
        else:
            # Real keys and values have roughly unit scale after layer norm; N(0, 1) per entry
            # (PEFT's default) is far larger in norm than a key head, so scale like a linear init.
            self.table = nn.Parameter(torch.randn(P, width) * config.head_dim**-0.5)

    def forward(self) -> torch.Tensor:
        if self.config.prefix_projection:
            return self.mlp(self.embedding.weight)
        return self.table

    def key_values(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer `(keys, values)`, each `[num_kv_heads, P, head_dim]`."""
        return table_to_key_values(self.forward(), self.config, dtype)

    @torch.no_grad()
    def fold(self) -> PrefixEncoder:
        """A projection-free copy holding the MLP's output as a plain table."""
        cfg = PrefixConfig(**{**self.config.to_dict(), "prefix_projection": False})
        folded = PrefixEncoder(cfg)
        folded.table.copy_(self.forward().float())
        return folded.to(self.forward().device)

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        """Initialise a projection-free prefix from a given table (text or adapter init)."""
        if self.config.prefix_projection:
            raise ValueError("set_table needs a prefix without projection")
        if tuple(table.shape) != tuple(self.table.shape):
            raise ValueError(f"table shape {tuple(table.shape)} != expected {tuple(self.table.shape)}")
        self.table.copy_(table.to(self.table))


def table_to_key_values(
    table: torch.Tensor, config: PrefixConfig, dtype: torch.dtype | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    P = table.shape[0]
    t = table.view(P, config.num_layers, 2, config.num_kv_heads, config.head_dim)
    t = t.permute(1, 2, 3, 0, 4)  # [layers, 2, heads, P, head_dim]
    if dtype is not None:
        t = t.to(dtype)
    return [(t[i, 0], t[i, 1]) for i in range(config.num_layers)]


def key_values_to_table(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of `table_to_key_values`: per-layer `[heads, P, head_dim]` pairs to `[P, width]`."""
    t = torch.stack([torch.stack([k, v]) for k, v in kvs])  # [layers, 2, heads, P, hd]
    P = t.shape[3]
    return t.permute(3, 0, 1, 2, 4).reshape(P, -1).contiguous()
