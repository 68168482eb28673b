"""app.ml.gguf: a tiny Llama written as GGUF (llama.cpp's names and q/k permutation) loads back
through the real transformers path with the same logits; bad files fail with a GGUFError naming
the file; a conversion is kept while its GGUF is unchanged and replaced when it changed."""

import pytest
import torch

from tests.gguf_tiny import CHAT_TEMPLATE, make_tiny_gguf, smollm2_gguf, write_non_llm_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def test_gguf_roundtrip_logits_match(tiny_gguf, tmp_path):
    from app.ml.base import load_base
    from app.ml.gguf import convert_gguf, converted_from, gguf_sha256

    hf_dir, path = tiny_gguf
    out = convert_gguf(path, tmp_path / "converted")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert converted_from(out) == gguf_sha256(path)
    a, b = load_base(hf_dir), load_base(str(out))
    text = "The quick brown fox jumps"
    ids_a = a.tokenizer(text, return_tensors="pt").input_ids
    ids_b = b.tokenizer(text, return_tensors="pt").input_ids
    assert ids_a.tolist() == ids_b.tolist()
    with torch.no_grad():
        la, lb = a.model(ids_a).logits, b.model(ids_b).logits
    # F32 tensors: equal up to float reassociation; a wrong q/k un-permutation moves them by ~1e-1
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert b.geometry == a.geometry and b.geometry.num_kv_heads == 2  # GQA: 4 query, 2 key-value heads
    assert b.tokenizer.chat_template == CHAT_TEMPLATE  # read from tokenizer.chat_template, saved with it
    assert b.tokenizer.eos_token_id == a.tokenizer.eos_token_id


def test_conversion_kept_then_replaced_when_the_gguf_changes(tiny_gguf, tmp_path, monkeypatch):
    import transformers

    from app.ml import gguf as g

    out = g.convert_gguf(tiny_gguf[1], tmp_path / "c")
    _hf2, other = make_tiny_gguf(tmp_path / "other", seed=1)
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    assert g.convert_gguf(tiny_gguf[1], out) == out and calls == []  # same file: converted once
    g.convert_gguf(other, out)  # same name, other weights: converted again, in place
    assert len(calls) == 1 and g.converted_from(out) == g.gguf_sha256(other)
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_concurrent_conversions_convert_once(tiny_gguf, tmp_path, monkeypatch):
    """Replicas sharing DATA_DIR start together: one converts, the others wait and reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    from app.ml import gguf as g

    calls, real = [], g._convert
    monkeypatch.setattr(g, "_convert", lambda *a: calls.append(a) or real(*a))
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: g.convert_gguf(tiny_gguf[1], tmp_path / "shared"), range(3)))
    assert len(calls) == 1 and len(set(outs)) == 1 and (outs[0] / "config.json").is_file()


def test_gguf_errors_name_the_file_and_why(tiny_gguf, tmp_path):
    from app.ml.gguf import GGUFError, convert_gguf

    with pytest.raises(GGUFError, match="missing.gguf: no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o1")
    data = open(tiny_gguf[1], "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="cut.gguf: unreadable or truncated"):
        convert_gguf(cut, tmp_path / "o2")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(GGUFError, match="bad.gguf: not a GGUF"):
        convert_gguf(bad, tmp_path / "o3")
    with pytest.raises(GGUFError, match="clip.gguf: GGUF architecture 'clip' is not a causal LM"):
        convert_gguf(write_non_llm_gguf(tmp_path / "clip.gguf"), tmp_path / "o4")
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3", "o4"))


@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 not fetched (scripts/smollm2.sh --fetch)")
def test_smollm2_converts_with_its_chat_template_and_gqa(tmp_path):
    """The real GGUF: 30 layers, 3 of 9 heads key-value, a chat template; greedy chat answers."""
    from app.ml.base import load_base
    from app.ml.data import format_chat
    from app.ml.gguf import convert_gguf, converted_from, gguf_sha256

    src = smollm2_gguf()
    done = src.parent.parent.parent / "models" / "smollm2"  # scripts/smollm2.sh's conversion, if made
    out = done if converted_from(done) == gguf_sha256(src) else convert_gguf(src, tmp_path / "smollm2")
    base = load_base(str(out))
    g = base.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.hidden_size) == (30, 3, 64, 576)
    assert base.model.config.num_attention_heads == 9 and base.model.config.vocab_size == 49152
    prompt = format_chat([{"role": "user", "content": "What is the capital of France?"}], base.tokenizer)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    ids = base.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out_ids = base.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in base.tokenizer.decode(out_ids[0, ids.shape[1]:])
    # a prefix lives in the 3 key-value heads: [heads, P, head_dim] per layer
    from app.ml.config import PrefixTrainingConfig
    from app.ml.data import Example
    from app.ml.train import train_prefix

    ex = [Example(f"Item: {w}. Category:", f" {c}") for w, c in [("apple", "fruit"), ("leek", "vegetable")] * 4]
    res = train_prefix(base, ex, config=PrefixTrainingConfig(n_epochs=2, batch_size=4, num_virtual_tokens=4,
                                                             checkpoint_every=0))
    kv = res.adapter.key_values()
    assert res.steps == 4 and len(kv) == 30 and tuple(kv[0][0].shape) == (3, 4, 64)
