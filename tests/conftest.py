"""Shared fixtures: tiny random GPT-2, Llama and Qwen2 (GQA) bases, saved with `save_pretrained`
and loaded back through the real `from_pretrained` path. Built once per test session."""

from __future__ import annotations

import random

import pytest
import torch

TINY_VOCAB_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "name: Aromi | food: Chinese | area: city centre -> Aromi serves Chinese food in the city centre.",
    "label: positive, negative, neutral. sentiment review text pizza coffee pub restaurant",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ !?.,;:'\"()[]{}<>=+-*/",
]


def _tiny_tokenizer():
    from app.ml.tokenizer import train_bytelevel_bpe

    return train_bytelevel_bpe(TINY_VOCAB_TEXT * 5, vocab_size=400)


def _tiny_config(arch: str, vocab_size: int, eos: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, **common)
    if arch == "llama":
        return LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, **common,
        )
    if arch == "qwen2":
        # GQA with an explicit head_dim that differs from hidden_size / heads
        return Qwen2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, intermediate_size=128, max_position_embeddings=256, **common,
        )
    raise ValueError(arch)


def build_tiny_base(arch: str, out_dir, seed: int = 0):
    from transformers import AutoModelForCausalLM

    random.seed(seed)
    torch.manual_seed(seed)
    tok = _tiny_tokenizer()
    cfg = _tiny_config(arch, len(tok), tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_base_dirs(tmp_path_factory):
    """{'gpt2': path, 'llama': path, 'qwen2': path}"""
    root = tmp_path_factory.mktemp("bases")
    return {arch: str(build_tiny_base(arch, root / arch)) for arch in ("gpt2", "llama", "qwen2")}


@pytest.fixture(params=["gpt2", "llama", "qwen2"])
def tiny_base_dir(request, tiny_base_dirs):
    return tiny_base_dirs[request.param]
