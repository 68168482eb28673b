"""A tiny Llama written as a GGUF file the way llama.cpp's convert_hf_to_gguf writes one: its tensor
names, its q/k row permutation, llama.* metadata and a gpt2-style byte-level BPE tokenizer (what
SmolLM2's GGUF carries). F32 tensors, so the GGUF-loaded model must equal the HF one to float
tolerance; transformers undoes the permutation on load, which the logits comparison checks."""

from __future__ import annotations

import json
from pathlib import Path

# a minimal ChatML-like template, so the chat path is exercised with a template read from the GGUF
CHAT_TEMPLATE = ("{% for m in messages %}[[ {{ m['role'] }} ]]\n{{ m['content'] }}\n[[ end ]]\n{% endfor %}"
                 "{% if add_generation_prompt %}[[ assistant ]]\n{% endif %}")


def _permute(w, n_head):
    # llama.cpp permutes q/k rows from HF's half-split rotary layout to interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(hf_dir, out_path, chat_template: str | None = CHAT_TEMPLATE):
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
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if chat_template:
        w.add_chat_template(chat_template)
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
    return Path(out_path)


def write_non_llm_gguf(out_path):
    """A well-formed GGUF of an architecture that is no causal LM (a CLIP vision tower's name)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(out_path), "clip")
    w.add_tensor("x.weight", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)


def make_tiny_gguf(root, name: str = "tiny-llama.gguf", seed: int = 0) -> tuple[str, str]:
    """(HF dir, GGUF path) of the same tiny Llama (untied output, 2 of 4 heads key-value)."""
    from tests.conftest import build_tiny_base

    root = Path(root)
    hf = build_tiny_base("llama", root / f"hf-{seed}", seed=seed, tie_word_embeddings=False)
    return str(hf), str(write_tiny_llama_gguf(str(hf), root / name))


def smollm2_gguf() -> Path | None:
    """The real SmolLM2 GGUF where scripts/smollm2.sh caches it (or $SMOLLM2_GGUF), else None."""
    import os

    candidates = [os.environ.get("SMOLLM2_GGUF")]
    data_dir = Path(os.environ.get("DATA_DIR") or Path(__file__).resolve().parents[1] / "var")
    candidates.append(str(data_dir / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    for c in candidates:
        if c and Path(c).is_file() and Path(c).stat().st_size > 0:
            return Path(c)
    return None
