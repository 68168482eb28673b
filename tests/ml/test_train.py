"""Prefix training: frozen base, real learning, determinism, resume, cancel, checkpointing, init."""

import json
import math
import types
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.ml.base import load_base
from app.ml.callbacks import TrainingCallbacks
from app.ml.config import PrefixTrainingConfig
from app.ml.data import Example, encode_prompt
from app.ml.kvcache import FrozenPrefixCache, ModelGeometry, batch_prefixes, positions_from_mask
from app.ml.prefix import PrefixConfig, table_to_key_values
from app.ml.train import (
    _batch_loss,
    _frozen_eval_mode,
    checkpoint_table,
    text_table,
    train_prefix,
)
from tests.conftest import _tiny_config, _tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: one intra-op thread avoids oversubscription and keeps these fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt2(tiny_base_dirs):
    return load_base(tiny_base_dirs["gpt2"])


@pytest.fixture(scope="module")
def llama(tiny_base_dirs):
    return load_base(tiny_base_dirs["llama"])


LABELS = {"pizza": " food", "noodles": " food", "coffee": " city", "tea": " city",
          "pub": " dog", "bar": " dog", "jumps": " fox", "runs": " fox"}
FILL = ["good", "bad", "ok", "great", "fine", "poor", "nice", "cold", "warm", "quick", "lazy", "brown",
        "odd", "new", "old", "big"]


def task(fills):
    """A one-word label that depends on one word of the prompt."""
    return [Example(f"review: {a} {w}", LABELS[w]) for w in LABELS for a in fills]


SMALL = task(FILL[:3])  # 24 examples
SMALL_VALID = task(FILL[14:15])


def cfg(**kw):
    base = dict(num_virtual_tokens=4, n_epochs=2, batch_size=4, checkpoint_every=0, eval_every=2,
                prefix_projection=False)
    return PrefixTrainingConfig(**{**base, **kw})


class StopAt(TrainingCallbacks):
    def __init__(self, step):
        self.stop_step, self.seen = step, []

    def on_progress(self, p):
        self.seen.append(p)

    def should_stop(self):
        return bool(self.seen) and self.seen[-1].step >= self.stop_step if self.stop_step else True


def prefix_logits(base, table, pcfg, ids):
    kv, pm = batch_prefixes([table_to_key_values(table, pcfg)], base.geometry, torch.float32, "cpu")
    full = torch.cat([pm, torch.ones(1, len(ids), dtype=torch.long)], 1)
    out = base.model(input_ids=torch.tensor([ids]), attention_mask=full,
                     position_ids=positions_from_mask(full, len(ids)), cache=FrozenPrefixCache(kv))
    return out.logits[0]


@torch.no_grad()
def label_accuracy(base, table, pcfg, examples):
    ok = 0
    for e in examples:
        ids = encode_prompt(base.tokenizer, e.prompt)
        first = base.tokenizer(e.completion, add_special_tokens=False)["input_ids"][0]
        ok += int(prefix_logits(base, table, pcfg, ids)[-1].argmax()) == first
    return ok / len(examples)


def test_base_stays_frozen_and_bit_identical(gpt2):
    model = gpt2.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()  # whatever state the caller left it in comes back
    r = train_prefix(gpt2, SMALL, SMALL_VALID, cfg(gradient_checkpointing=True))
    assert r.steps == 12 and not r.cancelled
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(m.training for m in model.modules())
    assert "forward" not in model.transformer.h[0].__dict__
    model.eval()


@pytest.fixture(scope="module")
def learnable_base():
    return make_learnable_base()


def make_learnable_base():
    """Tiny GPT-2 initialised at scale 0.1 instead of 0.02: at 0.02 the tied output embedding gives
    logit gaps of about 1 at most, so no prefix can make any token clearly win; 0.1 stands in for the
    scale of a trained base. Still random: the prefix alone must teach the task."""
    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    config = _tiny_config("gpt2", len(tok), tok.eos_token_id)
    config.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    return types.SimpleNamespace(model=model, tokenizer=tok, fingerprint="learnable",
                                 geometry=ModelGeometry.of(config), device="cpu")


def test_prefix_learns_word_to_label_on_held_out_prompts(learnable_base):
    train, held = task(FILL[:12]), task(FILL[12:])  # held-out prompts: unseen filler words
    config = PrefixTrainingConfig(prefix_projection=True, n_epochs=5, learning_rate=5e-3)
    r = train_prefix(learnable_base, train, held, config)
    untrained = train_prefix(learnable_base, train, held, config, callbacks=StopAt(0))
    assert untrained.steps == 0 and untrained.cancelled
    acc = label_accuracy(learnable_base, r.table, r.prefix_config, held)
    acc0 = label_accuracy(learnable_base, untrained.table, untrained.prefix_config, held)
    # chance is 1/4 (4 labels) and the untrained prefix predicts none of them
    assert acc >= 0.6 and acc0 <= 0.1, (acc, acc0)
    assert r.metrics["best_valid_loss"] < 0.5 * math.log(len(learnable_base.tokenizer))  # uniform: ~6


def test_same_seed_same_prefix_bit_for_bit(gpt2):
    a = train_prefix(gpt2, SMALL, SMALL_VALID, cfg(n_epochs=1))
    b = train_prefix(gpt2, SMALL, SMALL_VALID, cfg(n_epochs=1))
    c = train_prefix(gpt2, SMALL, SMALL_VALID, cfg(n_epochs=1, seed=1))
    assert torch.equal(a.table, b.table)
    assert not torch.equal(a.table, c.table)


def test_cancel_then_resume_equals_uninterrupted(gpt2, tmp_path):
    config = cfg(n_epochs=3, eval_every=2, grad_accum_steps=2, batch_size=2, prefix_projection=True,
                 projection_hidden_size=16)
    straight = train_prefix(gpt2, SMALL, SMALL_VALID, config, checkpoint_dir=tmp_path / "a")
    assert straight.steps == 18  # 12 batches of 2, 2 per optimizer step, 3 epochs

    stop = StopAt(7)
    cancelled = train_prefix(gpt2, SMALL, SMALL_VALID, config, callbacks=stop, checkpoint_dir=tmp_path / "b")
    assert cancelled.cancelled and cancelled.steps == 7  # stopped before the step after the request
    ckpt = tmp_path / "b" / "step-00000007"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tensors.safetensors"]  # no pickle
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 7 and state["config"]["grad_accum_steps"] == 2
    assert [p.step for p in stop.seen] == list(range(1, 8))
    assert stop.seen[-1].total_steps == 18 and stop.seen[-1].trained_tokens > stop.seen[0].trained_tokens > 0

    # resuming takes the config from the checkpoint, not from the caller
    resumed = train_prefix(gpt2, SMALL, SMALL_VALID, PrefixTrainingConfig(), checkpoint_dir=tmp_path / "b")
    assert not resumed.cancelled and resumed.steps == 18
    assert torch.equal(resumed.table, straight.table)
    assert resumed.metrics["best_step"] == straight.metrics["best_step"]
    assert resumed.metrics["trained_tokens"] == straight.metrics["trained_tokens"]

    with pytest.raises(ValueError, match="different training data"):
        train_prefix(gpt2, SMALL[:-1], SMALL_VALID, config, checkpoint_dir=tmp_path / "b")


def test_periodic_checkpoints_are_atomic_pruned_and_readable(gpt2, tmp_path):
    seen = []

    class CB(TrainingCallbacks):
        def on_checkpoint(self, step, metrics):
            seen.append((step, metrics["checkpoint_path"]))

    train_prefix(gpt2, SMALL, None, cfg(checkpoint_every=2, keep_checkpoints=2), CB(), tmp_path)
    assert [s for s, _ in seen] == [2, 4, 6, 8, 10]  # none at the last step: the result is returned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000010"]
    pcfg, table = checkpoint_table(tmp_path / "step-00000010")
    assert table.shape == (4, pcfg.table_width) and not pcfg.prefix_projection


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, request):
    base = request.getfixturevalue(arch)
    from app.ml.data import collate, tokenize_example
    from app.ml.prefix import PrefixEncoder

    g = base.geometry
    torch.manual_seed(0)
    enc = PrefixEncoder(PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, 4))
    batch = collate([tokenize_example(e, base.tokenizer, 64) for e in SMALL[:3]], base.tokenizer.eos_token_id)
    layer = base.model.model.layers[0] if arch == "llama" else base.model.transformer.h[0]
    calls = []  # the attention inside a checkpointed layer runs again in the backward pass
    hook = (layer.self_attn if arch == "llama" else layer.attn).register_forward_pre_hook(lambda *a: calls.append(1))
    grads = {}
    try:
        for gc in (False, True):
            calls.clear()
            enc.zero_grad()
            with _frozen_eval_mode(base.model, gc):
                loss, _ = _batch_loss(base.model, enc, g, batch, torch.float32, nullcontext, True)
                loss.backward()
            grads[gc] = (enc.table.grad.clone(), len(calls))
    finally:
        hook.remove()
    assert grads[False][0].abs().sum() > 0
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-6, rtol=1e-5)
    assert (grads[False][1], grads[True][1]) == (1, 2)  # the checkpointed layer really ran twice
    assert not base.model.training and "forward" not in layer.__dict__


def test_lean_gelu_same_loss_same_gradients_less_saved(gpt2):
    """GPT-2's op-by-op gelu_new runs as one function that keeps only its input for backward: the
    same loss bit for bit, the same gradients up to float rounding, far fewer bytes kept for the
    backward pass, and the module is put back afterwards (an instance-level forward included)."""
    from app.ml.data import collate, tokenize_example
    from app.ml.prefix import PrefixEncoder

    base = gpt2
    g = base.geometry
    torch.manual_seed(0)
    enc = PrefixEncoder(PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, 4, prefix_projection=True,
                                     projection_hidden_size=32, embedding_dim=g.hidden_size))
    batch = collate([tokenize_example(e, base.tokenizer, 64) for e in SMALL[:3]], base.tokenizer.eos_token_id)
    act = base.model.transformer.h[0].mlp.act
    assert type(act).__name__ == "NewGELUActivation"

    def own_forward(x, _forward=act.forward):
        return _forward(x)

    act.forward = own_forward
    out = {}
    try:
        for lean in (False, True):
            enc.zero_grad()
            kept = []

            def pack(t, kept=kept):
                kept.append(t.untyped_storage().nbytes())
                return t

            with _frozen_eval_mode(base.model, False, lean_activations=lean):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss, _ = _batch_loss(base.model, enc, g, batch, torch.float32, nullcontext, True)
                loss.backward()
            out[lean] = (loss.detach(), [p.grad.clone() for p in enc.parameters()], sum(kept))
        assert act.__dict__["forward"] is own_forward
    finally:
        del act.forward
    assert torch.equal(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1], strict=False):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert out[True][2] < 0.85 * out[False][2]  # tiny base: 4*hidden is small next to the vocabulary


def test_projection_is_folded_into_an_adapter(gpt2):
    r = train_prefix(gpt2, SMALL, None, cfg(n_epochs=1, prefix_projection=True, projection_hidden_size=32))
    assert not r.prefix_config.prefix_projection
    assert r.table.shape == (4, r.prefix_config.table_width) and r.table.dtype == torch.float32
    adapter = r.adapter
    assert torch.equal(adapter.table, r.table) and not adapter.config.prefix_projection
    assert adapter.metadata["base_fingerprint"] == gpt2.fingerprint


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_text_init_acts_like_the_text(arch, projection, request):
    """A text-initialised prefix is the base's own keys/values of the text: the model then gives
    the same logits as with the text itself in front of the prompt."""
    base = request.getfixturevalue(arch)
    text = "The quick brown"  # fewer tokens than P=6: repeated
    config = cfg(num_virtual_tokens=6, init="text", init_text=text, prefix_projection=projection)
    r = train_prefix(base, SMALL, None, config, callbacks=StopAt(0))  # stop before step 1: the init
    assert r.steps == 0
    text_ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    text_ids = (text_ids * 6)[:6]
    assert torch.allclose(r.table, text_table(base.model, base.tokenizer, text, 6), atol=1e-5)
    ids = base.tokenizer("review: good pizza", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = base.model(input_ids=torch.tensor([text_ids + ids])).logits[0, 6:]
        got = prefix_logits(base, r.table, r.prefix_config, ids)
    assert torch.allclose(got, want, atol=1e-4)


def test_adapter_init_copies_and_fits_length(gpt2):
    donor = train_prefix(gpt2, SMALL, None, cfg(n_epochs=1, num_virtual_tokens=5))
    same = train_prefix(gpt2, SMALL, None, cfg(num_virtual_tokens=5, init="adapter", init_adapter=donor.adapter),
                        callbacks=StopAt(0))
    assert torch.equal(same.table, donor.table)
    shorter = train_prefix(gpt2, SMALL, None, cfg(num_virtual_tokens=3, init="adapter", init_adapter=donor.table),
                           callbacks=StopAt(0))
    assert torch.equal(shorter.table, donor.table[-3:])  # the rows next to the prompt are kept
    longer = train_prefix(gpt2, SMALL, None, cfg(num_virtual_tokens=7, init="adapter", init_adapter=donor.adapter),
                          callbacks=StopAt(0))
    assert torch.equal(longer.table[-5:], donor.table) and longer.table[:2].abs().sum() > 0
    with pytest.raises(ValueError):
        train_prefix(gpt2, SMALL, None, cfg(init="adapter", init_adapter=torch.zeros(4, 3)))


def test_early_stopping_returns_the_best_prefix(gpt2):
    # validation text the training labels compete with: its loss soon rises as training goes on
    other = [Example(e.prompt, " the quick brown fox jumps over") for e in SMALL[:8]]
    evals = []

    class CB(TrainingCallbacks):
        def on_eval(self, step, metrics):
            evals.append((step, metrics["valid_loss"]))

    config = cfg(n_epochs=10, eval_every=1, early_stopping_patience=2, early_stopping_start=0.0, learning_rate=0.1)
    r = train_prefix(gpt2, SMALL, other, config, CB())
    assert r.metrics["early_stopped"] and r.steps < 60
    best_step, best = min(evals, key=lambda e: e[1])
    assert r.metrics["best_step"] == best_step and r.metrics["best_valid_loss"] == best
    assert [s for s, _ in evals][-1] - best_step == 2  # patience 2
    # the returned prefix is the best one, not the last: rerun up to the best step and compare
    upto = train_prefix(gpt2, SMALL, other, config, StopAt(best_step))
    assert torch.equal(r.table, upto.table)


def test_early_stopping_waits_for_its_start(gpt2):
    """Evaluations before `early_stopping_start` of the steps do not count against the patience."""
    other = [Example(e.prompt, " the quick brown fox jumps over") for e in SMALL[:8]]
    config = cfg(n_epochs=10, eval_every=1, early_stopping_patience=2, learning_rate=0.1)
    total = 10 * math.ceil(len(SMALL) / config.batch_size)
    at_once = train_prefix(gpt2, SMALL, other, replace(config, early_stopping_start=0.0))
    assert at_once.metrics["early_stopped"] and at_once.steps < 0.6 * total  # would stop before the start
    r = train_prefix(gpt2, SMALL, other, replace(config, early_stopping_start=0.6))
    assert r.steps >= 0.6 * total  # stopped after the start, or ran to the end
    with pytest.raises(ValueError, match="early_stopping_start"):
        cfg(early_stopping_start=1.5).validate()


def test_bf16_autocast_path_runs(gpt2):
    # what CUDA uses by default; CPU autocast exercises the same code (prefix stays fp32)
    r = train_prefix(gpt2, SMALL[:8], None, cfg(n_epochs=1, mixed_precision="bf16"))
    assert r.steps == 2 and r.table.dtype == torch.float32 and torch.isfinite(r.table).all()
    assert r.metrics["mixed_precision"] == "bf16" and r.metrics["device"] == "cpu"
    assert train_prefix(gpt2, SMALL[:8], None, cfg(n_epochs=1)).metrics["mixed_precision"] == "no"  # auto on CPU


def test_all_defaults_learn_word_to_label(learnable_base):
    """`PrefixTrainingConfig()` untouched (what a job sending `{"type": "prefix"}` gets) must teach
    a word -> label task on held-out prompts. A prefix that does not learn (an untrained or zero
    table) scores 0 here: the tiny base never predicts a label word by itself."""
    train, held = task(FILL[:12]), task(FILL[12:])  # held-out prompts: unseen filler words
    config = PrefixTrainingConfig(checkpoint_every=0)  # a runtime field: no checkpoint files
    r = train_prefix(learnable_base, train, held, config)
    assert r.steps > 0 and not r.cancelled
    untrained = train_prefix(learnable_base, train, held, config, callbacks=StopAt(0))
    acc = label_accuracy(learnable_base, r.table, r.prefix_config, held)
    acc0 = label_accuracy(learnable_base, untrained.table, untrained.prefix_config, held)
    zero = label_accuracy(learnable_base, torch.zeros_like(r.table), r.prefix_config, held)
    assert acc >= 0.6 and acc0 <= 0.1 and zero <= 0.1, (acc, acc0, zero)
