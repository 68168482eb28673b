"""app.ml.gguf: a tiny Llama written as GGUF (llama.cpp's names and q/k permutation) loads back
through the real transformers path with the same logits; bad files fail with a GGUFError."""

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_base


def _permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf permutes q/k rows for its rotary layout; transformers undoes it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(hf_dir, out_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(getattr(cfg, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # a gpt2-style byte-level BPE tokenizer, as llama.cpp writes SmolLM2's
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    hf = build_tiny_base("llama", root / "hf", tie_word_embeddings=False)
    return str(hf), str(write_tiny_llama_gguf(str(hf), root / "tiny.gguf"))


def test_gguf_roundtrip_logits_match(tiny_gguf, tmp_path):
    from app.ml.base import load_base
    from app.ml.gguf import convert_gguf

    hf_dir, path = tiny_gguf
    out = convert_gguf(path, tmp_path / "converted")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    a, b = load_base(hf_dir), load_base(str(out))
    text = "The quick brown fox jumps"
    ids_a = a.tokenizer(text, return_tensors="pt").input_ids
    ids_b = b.tokenizer(text, return_tensors="pt").input_ids
    assert ids_a.tolist() == ids_b.tolist()
    with torch.no_grad():
        la, lb = a.model(ids_a).logits, b.model(ids_b).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert b.geometry.num_kv_heads == 2 if hasattr(b.geometry, "num_kv_heads") else True
    assert convert_gguf(path, out) == out  # once


def test_gguf_errors(tiny_gguf, tmp_path):
    from app.ml.gguf import GGUFError, convert_gguf

    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o1")
    data = open(tiny_gguf[1], "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        convert_gguf(cut, tmp_path / "o2")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF"):
        convert_gguf(bad, tmp_path / "o3")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "clip.gguf"), "clip")
    w.add_tensor("x.weight", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="not a causal LM"):
        convert_gguf(tmp_path / "clip.gguf", tmp_path / "o4")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()
