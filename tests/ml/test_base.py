"""Base models: loading, fingerprints, presets, the default corpus and tokenizer, base training."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.ml.base import compute_fingerprint, load_base, prepare_tokenizer
from app.ml.callbacks import TrainingCallbacks
from app.ml.config import PRESETS, BaseTrainingConfig
from app.ml.corpus import TASK_LINE, clean_document, default_corpus, split_train_valid
from app.ml.kvcache import ModelGeometry
from app.ml.pretrain import META_FILE, count_parameters, model_config, train_base
from app.ml.tokenizer import train_bytelevel_bpe


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return default_corpus()  # ~10-25 s: parses the whole standard library once per session


@pytest.fixture(scope="session")
def corpus_tokenizer(corpus):
    # a slice large enough to reach the full 8k vocabulary, small enough to train in a second or two
    return train_bytelevel_bpe(corpus[:4000], vocab_size=8192)


@pytest.fixture(scope="module")
def small_texts(corpus):
    train, valid = split_train_valid(corpus[::40], valid_fraction=0.1)  # ~700 documents
    return train, valid


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, small_texts):
    train, valid = small_texts
    out = tmp_path_factory.mktemp("trained") / "base"
    result = train_base(str(out), train, valid, architecture="llama", size="tiny",
                        config=BaseTrainingConfig(steps=30, learning_rate=5e-3, max_eval_blocks=16), seed=0)
    return result


# --------------------------------------------------------------------------- loading and fingerprints


def test_load_base_is_frozen_with_geometry_and_left_padding(tiny_base_dir):
    base = load_base(tiny_base_dir)
    assert not base.model.training
    assert all(not p.requires_grad for p in base.model.parameters())
    assert base.geometry == ModelGeometry.of(base.model.config)
    assert base.tokenizer.pad_token is not None and base.tokenizer.padding_side == "left"
    assert base.fingerprint.startswith("sha256:") and len(base.fingerprint) == len("sha256:") + 16
    assert base.path == tiny_base_dir and base.device == torch.device("cpu")


def test_qwen2_geometry_reads_head_dim_and_kv_heads(tiny_base_dirs):
    g = load_base(tiny_base_dirs["qwen2"]).geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (2, 2, 24)


def test_missing_pad_token_becomes_eos(tiny_base_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_base_dirs["gpt2"], local_files_only=True)
    tok.pad_token = None
    tok.padding_side = "right"
    tok = prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_fingerprint_is_stable_and_sensitive(tiny_base_dirs):
    path = tiny_base_dirs["llama"]
    a, b = load_base(path), load_base(path)
    assert a.fingerprint == b.fingerprint == compute_fingerprint(b.model)
    # taken from the stored weights: serving in bfloat16 does not change it
    assert load_base(path, dtype=torch.bfloat16).fingerprint == a.fingerprint
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert compute_fingerprint(b.model) != a.fingerprint
    assert load_base(tiny_base_dirs["gpt2"]).fingerprint != a.fingerprint


def test_fingerprint_sees_config_changes(tiny_base_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dirs["gpt2"], local_files_only=True)
    before = compute_fingerprint(model)
    model.config.layer_norm_epsilon = 1e-3
    assert compute_fingerprint(model) != before


# --------------------------------------------------------------------------- presets


def test_presets_cover_both_styles_and_sizes():
    for arch in ("gpt2", "llama"):
        for size in ("tiny", "default", "small", "medium"):
            assert (arch, size) in PRESETS
    # GPU sizes use grouped-query attention; the CPU default full multi-head attention (prefixes
    # live in the KV heads: 2 KV heads learned word -> label far worse) and a wider init
    assert PRESETS[("llama", "small")].num_kv_heads < PRESETS[("llama", "small")].num_heads
    llama = PRESETS[("llama", "default")]
    assert llama.num_kv_heads == llama.num_heads and llama.init_std == 0.1
    assert model_config(llama, 8192, 0).initializer_range == 0.1
    for arch in ("gpt2", "llama"):
        p = PRESETS[(arch, "default")]
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(model_config(p, p.vocab_size, 0))
        assert 2_000_000 <= count_parameters(model) <= 8_000_000
    cfg = model_config(PRESETS[("llama", "small")], 8192, 0)
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 4


# --------------------------------------------------------------------------- corpus and tokenizer


def test_default_corpus_is_large_and_has_no_task_lines(corpus, corpus_tokenizer):
    assert len(corpus) == len(set(corpus))  # de-duplicated
    bad = [ln for doc in corpus for ln in doc.splitlines() if TASK_LINE.search(ln)]
    assert bad == []
    # estimate tokens from a deterministic sample encoded with the corpus tokenizer
    sample = corpus[::50]
    chars_per_token = sum(map(len, sample)) / sum(len(ids) for ids in corpus_tokenizer(sample)["input_ids"])
    est_tokens = sum(map(len, corpus)) / chars_per_token
    assert est_tokens >= 1_000_000, est_tokens
    assert sum(len(d.split()) for d in corpus) >= 500_000


def test_clean_document_drops_task_formatted_lines():
    doc = ("Some prose about the module.\nname[Aromi], food[Chinese]\nreview: great -> positive\n"
           '{"prompt": "x", "completion": "y"}\nInput: 3\nMore prose.')
    assert clean_document(doc) == "Some prose about the module.\nMore prose."


def test_split_is_deterministic_and_disjoint(corpus):
    a_train, a_valid = split_train_valid(corpus)
    b_train, b_valid = split_train_valid(list(reversed(corpus)))
    assert set(a_valid) == set(b_valid) and not set(a_valid) & set(a_train)
    assert 0.01 < len(a_valid) / len(corpus) < 0.04


def test_tokenizer_has_8k_entries_and_round_trips_any_text(corpus_tokenizer):
    tok = corpus_tokenizer
    assert len(tok) >= 8192
    text = "Return the 最大值 of a list 🙂🚀 — naïve café\tdone"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


# --------------------------------------------------------------------------- training


def test_train_base_lowers_validation_loss_and_writes_loadable_dir(tiny_trained):
    r = tiny_trained
    assert not r.cancelled and r.steps == 30
    assert r.metrics["valid_loss"] < r.metrics["initial_valid_loss"] - 0.5
    assert math.isclose(r.metrics["valid_perplexity"], math.exp(r.metrics["valid_loss"]), rel_tol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(r.path, local_files_only=True)
    assert model.config.model_type == "llama"
    assert compute_fingerprint(model) == r.fingerprint == load_base(r.path).fingerprint
    meta = json.load(open(os.path.join(r.path, META_FILE)))
    assert meta["fingerprint"] == r.fingerprint and meta["seed"] == 0 and meta["steps"] == 30
    assert meta["preset"]["size"] == "tiny" and meta["corpus"]["train_tokens"] > 0
    assert not [n for n in os.listdir(os.path.dirname(r.path)) if ".tmp-" in n]  # no leftovers


def test_same_seed_same_fingerprint(tmp_path, small_texts):
    train, valid = small_texts
    train = train[:200]
    cfg = BaseTrainingConfig(steps=3, max_eval_blocks=2)
    fps = [train_base(str(tmp_path / f"b{i}"), train, valid, architecture="gpt2", size="tiny", config=cfg,
                      seed=seed).fingerprint for i, seed in enumerate((7, 7, 8))]
    assert fps[0] == fps[1] != fps[2]


def test_continued_training_keeps_tokenizer(tmp_path, tiny_trained, small_texts):
    train, valid = small_texts
    parent = load_base(tiny_trained.path)
    r = train_base(str(tmp_path / "continued"), list(reversed(train)), valid, init_from=tiny_trained.path,
                   size="tiny", config=BaseTrainingConfig(steps=5, learning_rate=1e-3, max_eval_blocks=16), seed=1)
    child = load_base(r.path)
    assert child.tokenizer.get_vocab() == parent.tokenizer.get_vocab()
    assert child.fingerprint != parent.fingerprint
    meta = json.load(open(os.path.join(r.path, META_FILE)))
    assert meta["init_from"]["fingerprint"] == parent.fingerprint
    assert r.metrics["valid_loss"] <= r.metrics["initial_valid_loss"] + 0.05


class _StopAfter(TrainingCallbacks):
    def __init__(self, n):
        self.n, self.progress, self.evals = n, [], []

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def should_stop(self):
        return len(self.progress) >= self.n


def test_should_stop_cancels_within_one_step_and_writes_nothing(tmp_path, small_texts):
    train, valid = small_texts
    cb = _StopAfter(3)
    r = train_base(str(tmp_path / "cancelled"), train[:200], valid, architecture="gpt2", size="tiny",
                   config=BaseTrainingConfig(steps=50, max_eval_blocks=2), callbacks=cb)
    assert r.cancelled and r.steps == 3 and r.path is None
    assert [p.step for p in cb.progress] == [1, 2, 3]
    p = cb.progress[-1]
    assert p.total_steps == 50 and p.tokens_per_s > 0 and p.eta_s > 0 and p.trained_tokens == 3 * 8 * 64
    assert cb.evals[0][0] == 0  # the initial evaluation
    assert not os.path.exists(tmp_path / "cancelled") and os.listdir(tmp_path) == []


def test_refuses_to_overwrite(tmp_path, small_texts):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        train_base(str(tmp_path / "taken"), small_texts[0], size="tiny",
                   config=BaseTrainingConfig(steps=0, max_eval_blocks=2))


def test_zero_steps_writes_untrained_base(tmp_path, small_texts):
    random.seed(0)
    r = train_base(str(tmp_path / "fresh"), small_texts[0][:100], architecture="gpt2", size="tiny",
                   config=BaseTrainingConfig(steps=0, max_eval_blocks=2))
    base = load_base(r.path)
    assert r.steps == 0 and base.model.config.model_type == "gpt2"
    assert len(base.tokenizer) <= PRESETS[("gpt2", "tiny")].vocab_size


# --------------------------------------------------------------------------- checkpoints and resume

RESUME_CFG = BaseTrainingConfig(steps=10, max_eval_blocks=2)


class _Died(BaseException):
    """Stands in for the worker process dying mid-run: nothing in train_base catches it."""


class _DieAt(TrainingCallbacks):
    def __init__(self, step):
        self.step, self.checkpoints = step, []

    def on_checkpoint(self, step, metrics):
        assert os.path.isfile(os.path.join(metrics["checkpoint_path"], "state.json"))
        self.checkpoints.append(step)

    def on_progress(self, progress):
        if progress.step == self.step:
            raise _Died()


@pytest.fixture(scope="module")
def resume_texts(small_texts):
    # 33 blocks of 64 tokens: 10 steps of 8 blocks cross two epoch boundaries (a fresh data order)
    return small_texts[0][:40], small_texts[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, resume_texts):
    out = tmp_path_factory.mktemp("uninterrupted") / "base"
    return train_base(str(out), *resume_texts, size="tiny", config=RESUME_CFG, seed=3, device="cpu")


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


def _assert_same_weights(path, reference):
    a, b = _weights(path), _weights(reference.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(ckpt):
    return sorted(p.name for p in ckpt.iterdir())


def test_dead_run_resumes_from_last_checkpoint_bit_identical(tmp_path, resume_texts, uninterrupted, monkeypatch):
    ckpt = tmp_path / "ckpt"
    cb = _DieAt(7)
    with pytest.raises(_Died):
        train_base(str(tmp_path / "dead"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3, device="cpu",
                   callbacks=cb, checkpoint_dir=ckpt, checkpoint_every=2)
    assert cb.checkpoints == [2, 4, 6]
    assert _steps(ckpt) == ["step-00000004", "step-00000006"]  # pruned to the last 2, no temp dirs left
    assert os.path.isfile(ckpt / "step-00000006" / "tokenizer" / "tokenizer.json")  # the run's BPE

    # the resumed run reuses the saved BPE (retraining it could change the token ids)
    import app.ml.pretrain

    monkeypatch.setattr(app.ml.pretrain, "train_bytelevel_bpe", lambda *a, **k: pytest.fail("BPE retrained"))
    progress = _StopAfter(10**6)
    r = train_base(str(tmp_path / "resumed"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3,
                   device="cpu", callbacks=progress, checkpoint_dir=ckpt, checkpoint_every=2)
    assert not r.cancelled and r.steps == 10 and r.meta["resumed_from_step"] == 6
    assert [p.step for p in progress.progress] == [7, 8, 9, 10]
    assert r.metrics["trained_tokens"] == uninterrupted.metrics["trained_tokens"] == 10 * 8 * 64
    _assert_same_weights(r.path, uninterrupted)
    assert r.fingerprint == uninterrupted.fingerprint


def test_cancelled_run_checkpoints_and_resumes_bit_identical(tmp_path, resume_texts, uninterrupted):
    ckpt = tmp_path / "ckpt"
    r = train_base(str(tmp_path / "cancelled"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3,
                   device="cpu", callbacks=_StopAfter(5), checkpoint_dir=ckpt, checkpoint_every=4)
    assert r.cancelled and r.steps == 5 and r.path is None
    assert _steps(ckpt) == ["step-00000004", "step-00000005"]  # the periodic one and the one at cancel
    r = train_base(str(tmp_path / "resumed"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3,
                   device="cpu", checkpoint_dir=ckpt, checkpoint_every=4)
    assert r.steps == 10 and r.meta["resumed_from_step"] == 5
    _assert_same_weights(r.path, uninterrupted)


def test_half_written_or_corrupt_checkpoints_are_ignored(tmp_path, resume_texts, uninterrupted):
    import shutil

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Died):
        train_base(str(tmp_path / "dead"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3, device="cpu",
                   callbacks=_DieAt(7), checkpoint_dir=ckpt, checkpoint_every=3)
    assert _steps(ckpt) == ["step-00000003", "step-00000006"]
    # a save that died before its rename: complete files, temporary name
    shutil.copytree(ckpt / "step-00000006", ckpt / ".tmp-step-00000008-999")
    # a newer one whose tensors were cut short (e.g. an interrupted copy from blob storage)
    shutil.copytree(ckpt / "step-00000006", ckpt / "step-00000009")
    state = json.loads((ckpt / "step-00000009" / "state.json").read_text())
    (ckpt / "step-00000009" / "state.json").write_text(json.dumps({**state, "step": 9}))
    data = (ckpt / "step-00000009" / "tensors.safetensors").read_bytes()
    (ckpt / "step-00000009" / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    # and one with no state.json at all (its upload never finished)
    (ckpt / "step-00000008").mkdir()
    r = train_base(str(tmp_path / "resumed"), *resume_texts, size="tiny", config=RESUME_CFG, seed=3,
                   device="cpu", checkpoint_dir=ckpt, checkpoint_every=0)
    assert r.meta["resumed_from_step"] == 6
    _assert_same_weights(r.path, uninterrupted)


def test_checkpoint_of_another_run_is_refused(tmp_path, resume_texts):
    ckpt = tmp_path / "ckpt"
    train_base(str(tmp_path / "a"), *resume_texts, size="tiny", config=BaseTrainingConfig(steps=3, max_eval_blocks=2),
               seed=3, device="cpu", callbacks=_StopAfter(2), checkpoint_dir=ckpt)
    with pytest.raises(ValueError, match="another run"):
        train_base(str(tmp_path / "b"), *resume_texts, size="tiny",
                   config=BaseTrainingConfig(steps=3, max_eval_blocks=2, learning_rate=1e-2), seed=3, device="cpu",
                   checkpoint_dir=ckpt)


# --------------------------------------------------------------------------- the first-start build
# build_default_base on made-up documents (the `small_default_corpus` fixture): the `default` preset
# with a small BPE and 4 steps of 2 x 32 tokens builds in a few seconds


BUILD_CFG = BaseTrainingConfig(steps=4, batch_size=2, max_seq_len=32, max_eval_blocks=2)


def test_killed_default_build_resumes_from_its_checkpoint_same_fingerprint(tmp_path, small_default_corpus):
    from app.ml.pretrain import build_default_base

    straight = build_default_base(str(tmp_path / "straight"), config=BUILD_CFG)
    assert straight.meta["resumed_from_step"] is None and straight.steps == 4

    ckpt = tmp_path / "ckpt"
    dead = _DieAt(3)
    with pytest.raises(_Died):  # the process dies during step 4's progress report
        build_default_base(str(tmp_path / "dead"), config=BUILD_CFG, callbacks=dead, checkpoint_dir=ckpt,
                           checkpoint_every=2)
    assert dead.checkpoints == [2] and _steps(ckpt) == ["step-00000002"]
    assert not (tmp_path / "dead").exists()

    progress = _StopAfter(10**6)
    resumed = build_default_base(str(tmp_path / "resumed"), config=BUILD_CFG, callbacks=progress,
                                 checkpoint_dir=ckpt, checkpoint_every=2)
    assert resumed.meta["resumed_from_step"] == 2 and resumed.steps == 4
    assert [p.step for p in progress.progress] == [3, 4]  # steps 1-2 were not run again
    assert resumed.fingerprint == straight.fingerprint
    _assert_same_weights(resumed.path, straight)
    assert resumed.meta["corpus"]["name"] == "python-stdlib-docs"
    assert not resumed.metrics["stopped_by_time_budget"]


def test_default_build_discards_checkpoints_of_another_build(tmp_path, small_default_corpus):
    """E.g. DEFAULT_BASE_BUILD_STEPS or the Python version changed between two starts: the build
    starts over instead of refusing to start."""
    from app.ml.pretrain import build_default_base

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Died):
        build_default_base(str(tmp_path / "dead"), config=BUILD_CFG, callbacks=_DieAt(2), checkpoint_dir=ckpt,
                           checkpoint_every=1)
    assert _steps(ckpt) == ["step-00000001", "step-00000002"]
    other = replace(BUILD_CFG, steps=2)
    r = build_default_base(str(tmp_path / "other"), config=other, checkpoint_dir=ckpt, checkpoint_every=0)
    assert r.steps == 2 and r.meta["resumed_from_step"] is None
    assert not ckpt.exists() or _steps(ckpt) == []  # the other build's checkpoints are gone
    assert r.fingerprint == build_default_base(str(tmp_path / "plain"), config=other).fingerprint


def test_device_and_serving_dtype_settings(monkeypatch):
    from app.ml.base import resolve_device, resolve_serving_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_serving_dtype("auto", cpu) is None  # as stored: CPU serving matches float32 training
    assert resolve_serving_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_serving_dtype("float16", cpu)
    with pytest.raises(ValueError, match="not one of"):
        resolve_serving_dtype("int8", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_serving_dtype("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_serving_dtype("auto", gpu) is torch.float16
    assert resolve_serving_dtype("float32", gpu) is torch.float32
