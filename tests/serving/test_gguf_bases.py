"""GGUF files as bases (app.store.base_registry with app.ml.gguf): BASE_MODEL=<file>.gguf is converted once into
DATA_DIR/models/<id> and registered like any other base; a replica downloads the conversion
instead of converting; `register_source` (the admin route's) registers a directory or a GGUF and
refuses bad input with the path and the reason, registering nothing."""

import shutil
from pathlib import Path

import pytest

from app.config import Settings
from app.store import base_registry
from app.store.blobs import LocalBlobStore
from app.store.db import init_db, make_engine, make_session_factory
from app.store.tables import ModelRecord
from tests.gguf_tiny import make_tiny_gguf, write_non_llm_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def store(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    factory = make_session_factory(engine)
    yield settings, factory, LocalBlobStore(tmp_path / "blobs")
    engine.dispose()


@pytest.fixture
def conversions(monkeypatch):
    """Counts GGUF conversions (the ones app.store.base_registry runs)."""
    calls, real = [], base_registry.convert_gguf
    monkeypatch.setattr(base_registry, "convert_gguf", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_base_model_gguf_is_converted_once_registered_and_fetched_by_replicas(store, tiny_gguf, conversions):
    from app.ml.base import load_base
    from app.ml.gguf import gguf_sha256

    settings, factory, blobs = store
    s2 = settings.model_copy(update={"base_model": Path(tiny_gguf[1])})
    slug, path = base_registry.served_base_dir(s2)
    assert slug == "tiny-llama" and path == settings.data_dir.resolve() / "models" / "tiny-llama"
    with factory() as s:
        rec = base_registry.ensure_default_base(s2, s, blobs)
        assert rec.id == "tiny-llama" and rec.kind == "base" and rec.tenant_id is None
        assert rec.details["gguf"] == str(Path(tiny_gguf[1]).resolve())
        assert rec.details["gguf_sha256"] == gguf_sha256(tiny_gguf[1])
        assert rec.details["local_path"] == str(path)
        fingerprint = rec.fingerprint
    assert load_base(str(path)).fingerprint == fingerprint
    assert blobs.exists("bases/tiny-llama/_manifest.json")
    assert not blobs.exists("bases/tiny-llama/.gguf-source.json")  # a marker of this machine only
    with factory() as s:  # the next start loads the conversion
        assert base_registry.ensure_default_base(s2, s, blobs).fingerprint == fingerprint
    assert len(conversions) == 1
    shutil.rmtree(settings.data_dir / "models")  # a fresh replica: same database, storage and GGUF
    with factory() as s:
        assert base_registry.ensure_default_base(s2, s, blobs).fingerprint == fingerprint
    assert len(conversions) == 1 and (path / "config.json").is_file()
    assert load_base(str(path)).fingerprint == fingerprint


def test_base_model_id_names_the_base(store, tiny_gguf, conversions):
    settings, factory, blobs = store
    s2 = settings.model_copy(update={"base_model": Path(tiny_gguf[1]), "base_model_id": "smol"})
    with factory() as s:
        assert base_registry.ensure_default_base(s2, s, blobs).id == "smol"
    assert (settings.data_dir / "models" / "smol" / "config.json").is_file()
    with pytest.raises(ValueError, match="BASE_MODEL_ID must be a slug"):
        base_registry.served_base_dir(s2.model_copy(update={"base_model_id": "Not A Slug"}))


def test_base_model_bad_gguf_fails_with_the_reason(store, tmp_path):
    from app.ml.gguf import GGUFError

    settings, factory, blobs = store
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with factory() as s, pytest.raises(GGUFError, match="bad.gguf: unreadable or truncated"):
        base_registry.ensure_default_base(settings.model_copy(update={"base_model": bad}), s, blobs)
    with factory() as s:
        assert s.get(ModelRecord, "bad") is None


def test_register_source_gguf_and_directory(store, tiny_gguf, tiny_base_dirs, conversions):
    settings, factory, blobs = store
    with factory() as s:
        rec, created = base_registry.register_source(settings, s, blobs, tiny_gguf[1])
        assert created and rec.id == "tiny-llama" and rec.details["source"] == "admin"
        again, created = base_registry.register_source(settings, s, blobs, tiny_gguf[1])
        assert not created and again.fingerprint == rec.fingerprint and len(conversions) == 1
        rec2, created = base_registry.register_source(settings, s, blobs, tiny_base_dirs["qwen2"], "qwen-small")
        assert created and rec2.id == "qwen-small" and rec2.details["local_path"] == tiny_base_dirs["qwen2"]
        assert blobs.exists("bases/qwen-small/_manifest.json")
        # the same GGUF under a second id: its own conversion, its own record
        rec3, created = base_registry.register_source(settings, s, blobs, tiny_gguf[1], "tiny-2")
        assert created and rec3.fingerprint == rec.fingerprint
        assert (settings.data_dir / "models" / "tiny-2" / "config.json").is_file()


def test_register_source_refuses_bad_input(store, tiny_gguf, tiny_base_dirs, tmp_path):
    settings, factory, blobs = store
    data = Path(tiny_gguf[1]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    write_non_llm_gguf(tmp_path / "clip.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_base_dirs["llama"]) / "config.json", no_weights)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_dirs["llama"], broken)
    next(broken.glob("*.safetensors")).write_bytes(b"\0" * 64)
    cases = [
        (str(tmp_path / "missing.gguf"), None, "missing.gguf: no such file or directory"),
        ("relative/model.gguf", None, "the path must be absolute"),
        ("/tmp/a\0b.gguf", None, "not a usable path"),
        ("/" + "x" * 5000 + ".gguf", None, "not a usable path|no such file"),
        (str(tmp_path / "cut.gguf"), None, "cut.gguf: unreadable or truncated GGUF"),
        (str(tmp_path / "clip.gguf"), None, "clip.gguf: GGUF architecture 'clip' is not a causal LM"),
        (str(tmp_path / "notes.txt"), None, "notes.txt: neither a .gguf file nor a Hugging Face model directory"),
        (str(tmp_path), None, f"{tmp_path}: not a Hugging Face model directory \\(no config.json\\)"),
        (str(no_weights), None, "no-weights: the directory has no weights"),
        (str(broken), None, "broken: cannot be loaded as a causal LM"),
        (tiny_gguf[1], "Bad Id", "base id must be a slug"),
    ]
    with factory() as s:
        for path, slug, message in cases:
            with pytest.raises(base_registry.BaseSourceError, match=message):
                base_registry.register_source(settings, s, blobs, path, slug)
        assert s.query(ModelRecord).count() == 0
        assert not (settings.data_dir / "models").exists() or not any((settings.data_dir / "models").iterdir())
        rec, _ = base_registry.register_source(settings, s, blobs, tiny_base_dirs["llama"], "taken")
        with pytest.raises(base_registry.BaseIdTaken, match="already registered with other weights"):
            base_registry.register_source(settings, s, blobs, tiny_gguf[1], "taken")
        with pytest.raises(base_registry.BaseIdTaken, match="already registered with other weights"):
            base_registry.register_source(settings, s, blobs, tiny_base_dirs["qwen2"], "taken")
        with pytest.raises(base_registry.BaseIdTaken, match="reserved for the built-in base"):
            base_registry.register_source(settings, s, blobs, tiny_base_dirs["qwen2"], "default")
        assert s.get(ModelRecord, "taken").fingerprint == rec.fingerprint
