"""What was written before both trainers shared one checkpoint module and one set of names still
loads: an adapter, a PEFT export, a base directory, a base checkpoint and a prefix checkpoint, each
written here by hand in its old form (the base trainer said `lr`, `grad_clip`, `warmup_fraction`
and `epochs`; the prefix trainer kept its RNG states as byte lists in state.json)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from app.ml.adapter import import_peft, load_adapter
from app.ml.base import load_base
from app.ml.callbacks import TrainingCallbacks
from app.ml.config import BaseTrainingConfig, PrefixTrainingConfig
from app.ml.pretrain import train_base
from app.ml.train import train_prefix
from tests.conftest import small_default_corpus_texts
from tests.ml.test_train import SMALL, SMALL_VALID


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: one intra-op thread avoids oversubscription and keeps these fast
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _StopAfter(TrainingCallbacks):
    def __init__(self, n):
        self.n, self.step = n, 0

    def on_progress(self, p):
        self.step = p.step

    def should_stop(self):
        return self.step >= self.n


@pytest.fixture(scope="module")
def gpt2(tiny_base_dirs):
    return load_base(tiny_base_dirs["gpt2"])


def _table(base, P=3, seed=0):
    g = base.geometry
    return torch.randn(P, g.num_layers * 2 * g.num_kv_heads * g.head_dim, generator=torch.Generator().manual_seed(seed))


def test_adapter_and_peft_export_of_the_old_form_load(gpt2, tmp_path):
    g, table = gpt2.geometry, _table(gpt2)
    table_bytes = st_save({"prefix_table": table}, metadata={"format": "pt"})
    meta = {
        "base_fingerprint": gpt2.fingerprint, "num_virtual_tokens": 3, "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim, "dtype": "float32", "format_version": 1,
        "source": "prefix-tuning", "created_at": 1700000000, "metrics": {"best_valid_loss": 0.5},
        "training": {"method": "prefix", "num_virtual_tokens": 3, "n_epochs": 2, "batch_size": 8,
                     "learning_rate": None, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "lr_schedule": "cosine"},
        "table_sha256": hashlib.sha256(table_bytes).hexdigest(),
    }
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter.safetensors").write_bytes(table_bytes)
    (tmp_path / "adapter" / "adapter.json").write_text(json.dumps(meta))
    adapter = load_adapter(tmp_path / "adapter")
    assert torch.equal(adapter.table, table) and adapter.metadata["training"]["n_epochs"] == 2

    peft_config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                   "num_layers": g.num_layers, "token_dim": g.num_kv_heads * g.head_dim,
                   "num_attention_heads": g.num_kv_heads, "num_transformer_submodules": 1,
                   "prefix_projection": False, "inference_mode": True}
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(peft_config))
    save_file({"prompt_embeddings": table}, str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(import_peft(tmp_path / "peft", gpt2).table, table)


def test_base_directory_with_old_metadata_loads_and_trains_on(tiny_base_dirs, tmp_path):
    old = tmp_path / "old-base"
    shutil.copytree(tiny_base_dirs["llama"], old)
    (old / "base_meta.json").write_text(json.dumps({
        "fingerprint": load_base(tiny_base_dirs["llama"]).fingerprint, "architecture": "llama",
        "preset": {"architecture": "llama", "size": "tiny", "lr": 3e-3, "steps": 20},
        "hyperparameters": {"steps": 20, "epochs": None, "lr": 3e-3, "warmup_fraction": 0.05, "grad_clip": 1.0},
        "epochs": 0.5,
    }))
    assert load_base(str(old)).fingerprint == load_base(tiny_base_dirs["llama"]).fingerprint
    texts = small_default_corpus_texts(60)
    r = train_base(str(tmp_path / "child"), texts[:50], texts[50:], init_from=str(old), size="tiny",
                   config=BaseTrainingConfig(steps=1, max_eval_blocks=1), device="cpu")
    assert r.steps == 1 and r.meta["init_from"]["path"] == str(old)


def test_base_checkpoint_of_the_old_form_resumes_bit_identical(tmp_path):
    texts = small_default_corpus_texts(120)
    train, valid = texts[:100], texts[100:]
    cfg = BaseTrainingConfig(steps=4, max_eval_blocks=1)
    straight = train_base(str(tmp_path / "straight"), train, valid, size="tiny", config=cfg, seed=3, device="cpu")
    ckpt = tmp_path / "ckpt"
    train_base(str(tmp_path / "cancelled"), train, valid, size="tiny", config=cfg, seed=3, device="cpu",
               callbacks=_StopAfter(2), checkpoint_dir=ckpt)
    state_file = ckpt / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    run = state["run"]
    run["lr"], run["grad_clip"] = run.pop("learning_rate"), run.pop("max_grad_norm")  # the old names
    state_file.write_text(json.dumps(state))

    resumed = train_base(str(tmp_path / "resumed"), train, valid, size="tiny", config=cfg, seed=3, device="cpu",
                         checkpoint_dir=ckpt)
    assert resumed.meta["resumed_from_step"] == 2 and resumed.fingerprint == straight.fingerprint


def test_prefix_checkpoint_of_the_old_form_resumes_bit_identical(gpt2, tmp_path):
    config = PrefixTrainingConfig(num_virtual_tokens=4, n_epochs=2, batch_size=4, eval_every=2, checkpoint_every=0,
                                  prefix_projection=True, projection_hidden_size=16)
    straight = train_prefix(gpt2, SMALL, SMALL_VALID, config)
    cancelled = train_prefix(gpt2, SMALL, SMALL_VALID, config, _StopAfter(5), checkpoint_dir=tmp_path)
    assert cancelled.cancelled and cancelled.steps == 5
    path = tmp_path / "step-00000005"
    tensors = load_file(str(path / "tensors.safetensors"))
    state = json.loads((path / "state.json").read_text())
    # the old form: RNG states as byte lists in the JSON, the scheduler's rate under `lr`
    state["rng"] = {k[len("rng."):]: tensors.pop(k).tolist() for k in list(tensors) if k.startswith("rng.")}
    state["scheduler"]["lr"] = state["scheduler"].pop("learning_rate")
    save_file(tensors, str(path / "tensors.safetensors"))
    (path / "state.json").write_text(json.dumps(state))

    resumed = train_prefix(gpt2, SMALL, SMALL_VALID, PrefixTrainingConfig(), checkpoint_dir=tmp_path)
    assert resumed.steps == straight.steps and torch.equal(resumed.table, straight.table)
