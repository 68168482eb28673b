"""app.store.base_registry: slugs, register/materialize round trip, and the first-start default base."""

import shutil
from pathlib import Path

import pytest

from app.config import Settings
from app.store import base_registry
from app.store.blobs import LocalBlobStore
from app.store.db import init_db, make_engine, make_session_factory
from app.store.tables import ModelRecord


@pytest.fixture
def store(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    factory = make_session_factory(engine)
    yield settings, factory, LocalBlobStore(tmp_path / "blobs")
    engine.dispose()


def test_slugify():
    assert base_registry.slugify("Llama-3.2_1B Instruct") == "llama-3-2-1b-instruct"
    assert base_registry.slugify("///") == "base"
    assert base_registry.is_slug("gpt2") and not base_registry.is_slug("Bad_Slug") and not base_registry.is_slug("-x")


def test_register_then_materialize_elsewhere(store, tiny_base_dirs, tmp_path):
    settings, factory, blobs = store
    src = tmp_path / "src"
    shutil.copytree(tiny_base_dirs["gpt2"], src)
    with factory() as s:
        rec = base_registry.register_base(s, blobs, src, "my-base", owner_tenant_id=None)
        s.commit()
        assert rec.kind == "base" and rec.tenant_id is None and rec.fingerprint.startswith("sha256:")
    assert blobs.exists("bases/my-base/_manifest.json")
    with pytest.raises(ValueError):
        with factory() as s:
            base_registry.register_base(s, blobs, src, "Not A Slug")
    shutil.rmtree(src)  # another machine: the registered directory is not there
    with factory() as s:
        rec = s.get(ModelRecord, "my-base")
        out = base_registry.materialize_base(settings, blobs, rec)
        assert out == settings.data_dir.resolve() / "models" / "my-base"
        assert (out / "config.json").is_file()
        assert base_registry.materialize_base(settings, blobs, rec) == out  # once
        from app.ml.base import load_base

        assert load_base(str(out)).fingerprint == rec.fingerprint


def test_default_base_is_built_once_and_registered(store, tiny_base_dirs, monkeypatch):
    settings, factory, blobs = store
    calls = []

    def fake_build(out_dir, seed=0, callbacks=None, config=None, **kwargs):
        calls.append(out_dir)
        shutil.copytree(tiny_base_dirs["llama"], out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(base_registry, "build_default_base", fake_build)
    with factory() as s:
        rec = base_registry.ensure_default_base(settings, s, blobs)
        assert rec.id == "default" and rec.kind == "base" and rec.tenant_id is None
    assert (settings.data_dir / "models" / "default" / "config.json").is_file()
    with factory() as s:
        assert base_registry.ensure_default_base(settings, s, blobs).id == "default"
    assert len(calls) == 1
    # a fresh replica (new DATA_DIR, same database and storage) fetches it instead of building
    shutil.rmtree(settings.data_dir / "models")
    with factory() as s:
        base_registry.ensure_default_base(settings, s, blobs)
    assert len(calls) == 1 and (settings.data_dir / "models" / "default" / "config.json").is_file()


def test_base_model_env_is_registered_under_its_slug(store, tiny_base_dirs):
    settings, factory, blobs = store
    s2 = settings.model_copy(update={"base_model": Path(tiny_base_dirs["qwen2"])})
    with factory() as s:
        rec = base_registry.ensure_default_base(s2, s, blobs)
        assert rec.id == "qwen2" and rec.details["local_path"] == str(Path(tiny_base_dirs["qwen2"]).resolve())
    bad = settings.model_copy(update={"base_model": settings.data_dir / "missing"})
    with factory() as s, pytest.raises(FileNotFoundError):
        base_registry.ensure_default_base(bad, s, blobs)


def test_default_base_build_steps_setting_reaches_the_build(store, tiny_base_dirs, monkeypatch):
    settings, factory, blobs = store
    seen = []

    def fake_build(out_dir, seed=0, callbacks=None, config=None, **kwargs):
        seen.append(config)
        shutil.copytree(tiny_base_dirs["llama"], out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(base_registry, "build_default_base", fake_build)
    with factory() as s:
        base_registry.ensure_default_base(settings.model_copy(update={"default_base_build_steps": 5}), s, blobs)
    assert seen[0].steps == 5
    with pytest.raises(ValueError):  # pydantic refuses a negative step count at startup
        Settings(default_base_build_steps=-1)


class _Died(BaseException):
    """Stands in for the API process being killed mid-build: nothing catches it."""


def test_killed_first_start_build_resumes_on_next_start_then_cleans_up(store, small_default_corpus, monkeypatch,
                                                                        caplog):
    import json
    import logging

    settings, factory, blobs = store
    settings = settings.model_copy(update={"default_base_build_steps": 2})
    models = settings.data_dir.resolve() / "models"
    ckpt = models / base_registry.BUILD_CHECKPOINT_DIR

    class DieAtStep2(base_registry._BuildLog):
        def on_progress(self, progress):
            super().on_progress(progress)
            if progress.step == 2:
                raise _Died()

    caplog.set_level(logging.INFO, logger="prefixd.bases")
    monkeypatch.setattr(base_registry, "_BuildLog", DieAtStep2)
    with factory() as s, pytest.raises(_Died):
        base_registry.ensure_default_base(settings, s, blobs)
    assert not (models / "default").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000001"]  # under DATA_DIR, one per step here
    assert any("step 1 of 2 checkpointed" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(base_registry, "_BuildLog", DieAtStep2.__mro__[1])  # the next start runs to the end
    with factory() as s:
        rec = base_registry.ensure_default_base(settings, s, blobs)
    meta = json.loads((models / "default" / "base_meta.json").read_text())
    assert meta["resumed_from_step"] == 1 and meta["steps"] == 2
    assert rec.id == "default" and rec.fingerprint == meta["fingerprint"]
    assert not ckpt.exists()  # cleaned up once the base is in place
    assert sorted(p.name for p in models.iterdir()) == [base_registry.BUILD_LOCK_FILE, "default"]

