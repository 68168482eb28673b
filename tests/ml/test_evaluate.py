import math

import pytest
import torch
from transformers import DynamicCache

from app.ml.base import load_base
from app.ml.data import encode_prompt
from app.ml.evaluate import (
    compare,
    completion_nll,
    corpus_bleu,
    corpus_chrf,
    evaluate,
    exact_match,
    group_references,
    normalize_text,
)
from app.ml.prefix import PrefixConfig, PrefixEncoder

PAIRS = [
    ("name: Aromi | food: Chinese ->", " Aromi serves Chinese food."),
    ("label:", " positive"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("name: Aromi | food: Chinese ->", " Aromi is a Chinese place in the city centre."),
    ("sentiment review text pizza", " coffee pub"),
]


def _prefix(base, P=4, seed=0):
    torch.manual_seed(seed)
    g = base.geometry
    return PrefixEncoder(PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)).requires_grad_(
        False
    )


def _manual_nll(base, pairs, prefix=None):
    """One example at a time, no padding, prefix via a plain DynamicCache and explicit positions."""
    tok, model = base.tokenizer, base.model
    total, n = 0.0, 0
    for prompt, completion in pairs:
        p = encode_prompt(tok, prompt)
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        P = 0 if prefix is None else prefix.config.num_virtual_tokens
        cache = None
        if prefix is not None:
            cache = DynamicCache()
            for layer, (k, v) in enumerate(prefix.key_values()):
                cache.update(k.unsqueeze(0), v.unsqueeze(0), layer)
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones(1, P + ids.shape[1], dtype=torch.long),
                position_ids=torch.arange(P, P + ids.shape[1]).unsqueeze(0),
                cache=cache,
            ).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        for j in range(len(p), len(p) + len(c)):
            total -= float(logp[j - 1, ids[0, j]])
            n += 1
    return total, n


def _reference_greedy(base, prompt, max_new):
    """Step-by-step greedy that recomputes the whole sequence each step (no prefix)."""
    tok, model = base.tokenizer, base.model
    ids = encode_prompt(tok, prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_metric_functions():
    assert normalize_text("  a \n b\t c ") == "a b c"
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert corpus_chrf(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # multi-reference with different counts per hypothesis: any reference may match
    hyps = ["the cat sat on the mat", "a dog runs in the park"]
    refs = [["something else entirely", " the cat  sat on the mat "], ["a dog runs in the park"]]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)
    assert exact_match(hyps, refs) == 1.0
    assert exact_match(hyps, [["x"], ["a dog runs in the park"]]) == 0.5
    assert 0 < corpus_bleu(["the cat sat on a mat"], [["the cat sat on the mat"]]) < 100
    assert corpus_bleu(["zzz"], [["the cat sat on the mat"]]) == pytest.approx(0.0)
    prompts, grouped = group_references(PAIRS)
    assert prompts[0] == PAIRS[0][0] and len(grouped[0]) == 2 and len(prompts) == 4


@pytest.mark.parametrize("with_prefix", [False, True])
def test_loss_equals_manual_computation(tiny_base_dir, with_prefix):
    base = load_base(tiny_base_dir)
    prefix = _prefix(base) if with_prefix else None
    total, n = completion_nll(base, PAIRS, prefix, batch_size=3)  # padded, mixed lengths
    want_total, want_n = _manual_nll(base, PAIRS, prefix)
    assert n == want_n
    assert total == pytest.approx(want_total, rel=1e-4)
    m = evaluate(base, PAIRS, prefix, generate_text=False)
    assert m["loss"] == pytest.approx(want_total / want_n, rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(want_total / want_n), rel=1e-4)
    assert m["n"] == len(PAIRS) and m["bleu"] is None


def test_generated_metrics_in_range_and_exact_match(tiny_base_dirs):
    pytest.importorskip("app.ml.generate")
    base = load_base(tiny_base_dirs["llama"])
    prompts = sorted({p for p, _ in PAIRS})
    max_new = 6
    own = [_reference_greedy(base, p, max_new) for p in prompts]
    # references = the model's own greedy outputs: everything matches
    mine = [(p, o) for p, o in zip(prompts, own, strict=False)]
    m = evaluate(base, mine, max_new_tokens=max_new, batch_size=2, return_generations=True)
    assert [g["text"] for g in m["generations"]] == own
    assert m["exact_match"] == 1.0
    if all(len(o.split()) >= 4 for o in own):
        assert m["bleu"] == pytest.approx(100.0)
    assert m["chrf"] == pytest.approx(100.0)
    # a stop string ends each generation before it (single-line references: stop=["\n"])
    m = evaluate(base, mine, max_new_tokens=max_new, stop=[" "], return_generations=True, generate_text=True)
    assert [g["text"] for g in m["generations"]] == [o.split(" ")[0] for o in own]
    # real references the random model never produces
    m = evaluate(base, PAIRS, max_new_tokens=max_new)
    assert m["exact_match"] == 0.0
    for k in ("bleu", "chrf"):
        assert 0.0 <= m[k] <= 100.0
    assert m["loss"] > 0 and m["perplexity"] > 1 and m["n_prompts"] == 4


def test_compare_reports_both_and_gain(tiny_base_dirs):
    pytest.importorskip("app.ml.generate")
    base = load_base(tiny_base_dirs["gpt2"])
    out = compare(base, PAIRS, _prefix(base), max_new_tokens=4)
    assert set(out) == {"base", "prefix", "gain"}
    assert out["base"]["loss"] != out["prefix"]["loss"]
    assert out["gain"]["loss"] == pytest.approx(out["prefix"]["loss"] - out["base"]["loss"])
    assert out["gain"]["bleu"] == pytest.approx(out["prefix"]["bleu"] - out["base"]["bleu"])
