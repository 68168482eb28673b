"""Shared fixtures: tiny random GPT-2, Llama and Qwen2 (GQA) bases, saved with `save_pretrained`
and loaded back through the real `from_pretrained` path. Built once per test session."""

from __future__ import annotations

import random
import socket

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


def build_tiny_base(arch: str, out_dir, seed: int = 0, **config_overrides):
    from transformers import AutoModelForCausalLM

    random.seed(seed)
    torch.manual_seed(seed)
    tok = _tiny_tokenizer()
    cfg = _tiny_config(arch, len(tok), tok.eos_token_id)
    for name, value in config_overrides.items():
        setattr(cfg, name, value)
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


def build_learnable_base(out_dir, seed: int = 0):
    """A tiny random Llama that a prefix can steer: full multi-head attention (4 KV heads, not 2;
    the prefix lives in the KV heads) and init std 0.1 instead of 0.02 (at 0.02 the tied output
    embedding leaves logit gaps of about 1, so no prefix makes one label clearly win). Still random:
    whatever it answers after prefix tuning, the prefix taught it. Measured with the engine's
    default prefix settings on the word -> label task of tests/integration/test_learning_flow.py:
    98-100% exact match on unseen prompts in ~1000 steps (6-9 s on one core; the defaults now run
    ~2000), 0% without a prefix;
    the same defaults reached 25% on the GPT-2 above (one label for all) and 17% on it at std 0.1."""
    return build_tiny_base("llama", out_dir, seed, num_key_value_heads=4, initializer_range=0.1)  # 4 = its heads


@pytest.fixture(scope="session")
def learnable_base_dir(tmp_path_factory):
    """Path of `build_learnable_base`, built once per session; served as base id `learnable`."""
    return str(build_learnable_base(tmp_path_factory.mktemp("bases-learnable") / "learnable"))


def small_default_corpus_texts(n: int = 400) -> list[str]:
    """Made-up documents (~100k characters) that stand in for the stdlib corpus of the first-start
    build: the `default` preset then builds in seconds (small BPE, a few steps)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


@pytest.fixture
def small_default_corpus(monkeypatch):
    """`build_default_base` reads `small_default_corpus_texts()` instead of the standard library."""
    import app.ml.pretrain

    texts = small_default_corpus_texts()
    monkeypatch.setattr(app.ml.pretrain, "default_corpus", lambda: list(texts))
    return texts


# a real S3 API (moto's server over HTTP) for the blob store and recovery tests
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
