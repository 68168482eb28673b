"""The adapter format, its safety checks, and interop with the real PEFT package (0.21.2).

PEFT's logits are the reference: our engine (FrozenPrefixCache + batch_prefixes +
positions_from_mask, exactly as in test_prefix.py) must give the same numbers for the same table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM

from app.ml.adapter import (
    META_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TABLE_FILE,
    Adapter,
    AdapterFormatError,
    AdapterMismatchError,
    ZipLimits,
    adapter_from_bytes,
    adapter_to_bytes,
    check_compatible,
    deserialize_adapter,
    export_peft,
    export_peft_zip,
    import_peft,
    import_peft_zip,
    load_adapter,
    read_zip_safely,
    save_adapter,
    serialize_adapter,
)
from app.ml.base import load_base
from app.ml.kvcache import FrozenPrefixCache, batch_prefixes, positions_from_mask
from app.ml.prefix import PrefixConfig, PrefixEncoder

peft = pytest.importorskip("peft")

# PEFT 0.21.2 still passes `past_key_values=` (renamed `cache=` in transformers 5); harmless here.
# peft also calls transformers' deprecated `is_gradient_checkpointing`.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def bases(tiny_base_dirs):
    return {arch: load_base(path) for arch, path in tiny_base_dirs.items()}


def _fresh_model(path):
    """PEFT wraps the model it is given; give it its own copy so the shared base stays clean."""
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _random_adapter(base, P=4, seed=0, scale=1.0) -> Adapter:
    g = base.geometry
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(P, cfg.table_width, generator=gen) * scale
    return Adapter.from_table(table, cfg, base.fingerprint, training={"lr": 0.01}, metrics={"loss": 1.5})


@torch.no_grad()
def _engine_logits(base, adapter, ids, mask):
    """Our serving path: the prefix as a frozen cache, mask = [prefix | tokens], cumsum positions."""
    B, L = ids.shape
    kv = adapter.key_values(dtype=torch.float32)
    bkv, pmask = batch_prefixes([kv] * B, base.geometry, torch.float32, "cpu")
    full = torch.cat([pmask, mask], 1)
    out = base.model(input_ids=ids, attention_mask=full, position_ids=positions_from_mask(full, L),
                     cache=FrozenPrefixCache(bkv))
    return out.logits


# ---------------------------------------------------------------- native format


def test_save_load_roundtrip_exact(bases, tmp_path):
    base = bases["qwen2"]
    a = _random_adapter(base, P=5)
    target = tmp_path / "adapters" / "a1"
    save_adapter(a, target)
    assert sorted(os.listdir(target)) == [META_FILE, TABLE_FILE]
    b = load_adapter(target)
    assert torch.equal(a.table, b.table) and b.table.dtype == torch.float32
    assert b.config == a.config
    assert b.metadata == a.metadata
    assert b.base_fingerprint == base.fingerprint and b.num_virtual_tokens == 5
    assert b.size_bytes == 5 * a.config.table_width * 4
    for key in ("num_layers", "num_kv_heads", "head_dim", "dtype", "created_at", "format_version", "training"):
        assert key in b.metadata

    # overwrite in place: the new adapter replaces the old, and no temp dirs are left behind
    c = _random_adapter(base, P=3, seed=1)
    save_adapter(c, target)
    assert torch.equal(load_adapter(target).table, c.table)
    assert sorted(os.listdir(target.parent)) == ["a1"]

    # one-blob and files-dict forms
    assert torch.equal(adapter_from_bytes(adapter_to_bytes(a)).table, a.table)
    assert torch.equal(deserialize_adapter(serialize_adapter(a)).table, a.table)
    assert adapter_to_bytes(a) == adapter_to_bytes(a)  # deterministic bytes


def test_save_is_atomic_when_interrupted(bases, tmp_path, monkeypatch):
    base = bases["gpt2"]
    old, new = _random_adapter(base, seed=1), _random_adapter(base, seed=2)
    target = save_adapter(old, tmp_path / "a")
    calls = []

    def failing_fsync(fd):  # the crash: the second file of the new adapter never reaches disk
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(new, target)
    monkeypatch.undo()
    assert torch.equal(load_adapter(target).table, old.table)  # the old adapter, whole
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no half-written temp dir left behind
    with pytest.raises(AdapterFormatError, match="base_fingerprint"):
        save_adapter(Adapter(new.config, new.table, {}), tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_key_values_layout(bases):
    base = bases["llama"]
    a = _random_adapter(base, P=3)
    kv = a.key_values(dtype=torch.float16)
    g = base.geometry
    assert len(kv) == g.num_layers and kv[0][0].shape == (g.num_kv_heads, 3, g.head_dim)
    assert kv[0][0].dtype == torch.float16
    # layer 1's values are block 3 of the table (PEFT layout)
    block = g.num_kv_heads * g.head_dim
    values = kv[1][1].float().permute(1, 0, 2).reshape(3, -1)
    assert torch.equal(values, a.table[:, 3 * block : 4 * block].half().float())


def test_from_encoder_folds_projection(bases):
    g = bases["gpt2"].geometry
    enc = PrefixEncoder(
        PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, 4, prefix_projection=True, projection_hidden_size=8)
    )
    a = Adapter.from_encoder(enc, "fp")
    assert not a.config.prefix_projection
    assert torch.allclose(a.table, enc().detach())


def _mutated(files, **json_changes):
    files = dict(files)
    meta = json.loads(files[META_FILE])
    meta.update(json_changes)
    files[META_FILE] = json.dumps(meta).encode()
    return files


def _with_table(files, tensors, **json_changes):
    blob = st_save(tensors)
    return _mutated({**files, TABLE_FILE: blob}, table_sha256=hashlib.sha256(blob).hexdigest(), **json_changes)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("bad_json", "not valid JSON"),
        ("json_list", "JSON object"),
        ("missing_table", "missing adapter.safetensors"),
        ("not_safetensors", "not a valid safetensors"),
        ("sha_mismatch", "table_sha256"),
        ("wrong_tensor_name", "exactly one tensor"),
        ("extra_tensor", "exactly one tensor"),
        ("wrong_shape", "table shape"),
        ("meta_geometry", "table shape"),
        ("nan", "non-finite"),
        ("int_dtype", "dtype"),
        ("newer_version", "newer"),
        ("no_fingerprint", "base_fingerprint"),
        ("bad_layers", "num_layers must be a positive integer"),
    ],
)
def test_deserialize_rejects_bad_input(bases, case, needle):
    a = _random_adapter(bases["gpt2"], P=4)
    files = serialize_adapter(a)
    good = a.table
    bad = {
        "bad_json": lambda: {**files, META_FILE: b"{not json"},
        "json_list": lambda: {**files, META_FILE: b"[1, 2]"},
        "missing_table": lambda: {META_FILE: files[META_FILE]},
        "not_safetensors": lambda: _mutated({**files, TABLE_FILE: b"\x00" * 64}, table_sha256=None),
        "sha_mismatch": lambda: {**files, TABLE_FILE: st_save({"prefix_table": good + 1})},
        "wrong_tensor_name": lambda: _with_table(files, {"weights": good}),
        "extra_tensor": lambda: _with_table(files, {"prefix_table": good, "x": good.clone()}),
        "wrong_shape": lambda: _with_table(files, {"prefix_table": good[:3]}),
        "meta_geometry": lambda: _mutated(files, num_kv_heads=2),
        "nan": lambda: _with_table(
            files, {"prefix_table": good.clone().index_fill_(0, torch.tensor([1]), float("nan"))}
        ),
        "int_dtype": lambda: _with_table(files, {"prefix_table": good.long()}),
        "newer_version": lambda: _mutated(files, format_version=99),
        "no_fingerprint": lambda: _mutated(files, base_fingerprint=""),
        "bad_layers": lambda: _mutated(files, num_layers="2"),
    }[case]()
    with pytest.raises(AdapterFormatError, match=needle):
        deserialize_adapter(bad)


def test_load_adapter_dir_errors(bases, tmp_path):
    with pytest.raises(AdapterFormatError, match="missing"):
        load_adapter(tmp_path / "nothing")
    d = save_adapter(_random_adapter(bases["gpt2"]), tmp_path / "a")
    (d / META_FILE).write_text("{")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(d)


def test_check_compatible(bases):
    a = _random_adapter(bases["llama"])
    check_compatible(a, bases["llama"])
    other = SimpleNamespace(fingerprint="other-fp-123", geometry=bases["llama"].geometry)
    with pytest.raises(AdapterMismatchError) as e:
        check_compatible(a, other)
    assert bases["llama"].fingerprint in str(e.value) and "other-fp-123" in str(e.value)
    # same fingerprint claimed but different shape: the geometry is named too
    with pytest.raises(AdapterMismatchError, match="geometry mismatch.*\\(2, 2, 16\\).*\\(2, 2, 24\\)"):
        check_compatible(a, SimpleNamespace(fingerprint=a.base_fingerprint, geometry=bases["qwen2"].geometry))


# ---------------------------------------------------------------- PEFT interop (real peft)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_peft_loads_our_export_with_same_logits(bases, tiny_base_dirs, tmp_path, arch):
    from peft import PeftModel

    base = bases[arch]
    a = _random_adapter(base, P=6, seed=3)
    out = export_peft(a, tmp_path / "peft", base_model_name_or_path=tiny_base_dirs[arch])
    assert sorted(os.listdir(out)) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]

    peft_model = PeftModel.from_pretrained(_fresh_model(tiny_base_dirs[arch]), str(out)).eval()
    cfg = peft_model.peft_config["default"]
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim) == (
        base.geometry.num_layers,
        base.geometry.num_kv_heads,
        base.geometry.num_kv_heads * base.geometry.head_dim,
    )
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, a.table)

    ids = torch.tensor(PROMPT)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        plain = base.model(input_ids=ids, attention_mask=mask).logits
    ours = _engine_logits(base, a, ids, mask)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-2  # the prefix really does something

    # the zip form round-trips through our importer unchanged
    b = import_peft_zip(export_peft_zip(a, tiny_base_dirs[arch]), base)
    assert torch.equal(b.table, a.table)
    assert b.metadata["source"] == "peft-import" and b.base_fingerprint == base.fingerprint


@pytest.mark.parametrize("arch, projection", [("gpt2", False), ("llama", False), ("qwen2", False), ("gpt2", True)])
def test_import_peft_trained_prefix_gives_peft_logits(bases, tiny_base_dirs, tmp_path, arch, projection):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    path = tiny_base_dirs[arch]
    torch.manual_seed(0)
    kwargs = dict(encoder_hidden_size=16) if projection else {}
    trainee = get_peft_model(
        _fresh_model(path),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection, **kwargs),
    )
    trainee.train()
    opt = torch.optim.Adam([p for p in trainee.parameters() if p.requires_grad], lr=0.05)
    batch = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    initial = trainee.get_prompt_embedding_to_save("default").clone()
    for _ in range(3):
        loss = trainee(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(trainee.get_prompt_embedding_to_save("default"), initial)
    trainee.save_pretrained(tmp_path / "peft")

    a = import_peft(tmp_path / "peft", bases[arch])
    assert a.num_virtual_tokens == 5 and a.metadata["source"] == "peft-import"
    assert a.metadata["peft"]["prefix_projection"] is projection
    check_compatible(a, bases[arch])

    reloaded = PeftModel.from_pretrained(_fresh_model(path), str(tmp_path / "peft")).eval()
    ids = torch.tensor(PROMPT)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits
    assert (_engine_logits(bases[arch], a, ids, mask) - theirs).abs().max() <= 1e-4


def test_peft_left_padding_convention(bases, tiny_base_dirs, tmp_path):
    """Pins the one convention gap we found in peft 0.21.2: on a left-padded row, PEFT without
    position_ids lets the model count from the cache length (first real token at P + pads);
    ours puts it at P. With position_ids = cumsum(mask) - 1 (PEFT adds P), the two agree."""
    from peft import PeftModel

    base = bases["gpt2"]
    a = _random_adapter(base, P=4, seed=5)
    peft_model = PeftModel.from_pretrained(
        _fresh_model(tiny_base_dirs["gpt2"]), str(export_peft(a, tmp_path / "p"))
    ).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ours = _engine_logits(base, a, ids, mask)
    with torch.no_grad():
        default = peft_model(input_ids=ids, attention_mask=mask).logits
        aligned = peft_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (ours[1] - default[1]).abs().max() <= 1e-4  # unpadded row: same convention
    assert (ours[0, 2:] - default[0, 2:]).abs().max() > 1e-3  # padded row: PEFT shifts positions by the pads
    assert (ours[0, 2:] - aligned[0, 2:]).abs().max() <= 1e-4


def test_import_peft_rejects_bad_input(bases, tiny_base_dirs, tmp_path):
    llama, qwen = bases["llama"], bases["qwen2"]
    files = {}
    with zipfile.ZipFile(io.BytesIO(export_peft_zip(_random_adapter(llama)))) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cfg = json.loads(files[PEFT_CONFIG_FILE])

    with pytest.raises(AdapterFormatError, match="does not fit the base"):
        import_peft(files, qwen)
    with pytest.raises(AdapterFormatError, match="peft_type"):
        import_peft({**files, PEFT_CONFIG_FILE: json.dumps({**cfg, "peft_type": "LORA"}).encode()}, llama)
    with pytest.raises(AdapterFormatError, match="num_transformer_submodules"):
        import_peft({**files, PEFT_CONFIG_FILE: json.dumps({**cfg, "num_transformer_submodules": 2}).encode()}, llama)
    with pytest.raises(AdapterFormatError, match="table shape"):
        import_peft({**files, PEFT_CONFIG_FILE: json.dumps({**cfg, "num_virtual_tokens": 7}).encode()}, llama)
    with pytest.raises(AdapterFormatError, match="exactly one tensor 'prompt_embeddings'"):
        import_peft({**files, PEFT_WEIGHTS_FILE: st_save({"prefix_table": torch.zeros(4, 128)})}, llama)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        import_peft({**files, PEFT_CONFIG_FILE: b"\xff\xfe"}, llama)
    # a directory with only the pickled weights is refused, never torch.load-ed
    d = tmp_path / "pickled"
    d.mkdir()
    (d / PEFT_CONFIG_FILE).write_bytes(files[PEFT_CONFIG_FILE])
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="adapter_model.bin is not accepted"):
        import_peft(d, llama)


# ---------------------------------------------------------------- zip safety


def _zip(entries, compression=zipfile.ZIP_DEFLATED):
    """entries: list of (name, bytes) or (ZipInfo, bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data, compress_type=compression)
    return buf.getvalue()


def test_zip_ignores_unknown_entries(bases):
    a = _random_adapter(bases["gpt2"])
    with zipfile.ZipFile(io.BytesIO(export_peft_zip(a))) as zf:
        entries = [(n, zf.read(n)) for n in zf.namelist()]
    b = import_peft_zip(_zip(entries + [("README.md", b"# model card"), ("sub/notes.txt", b"x")]), bases["gpt2"])
    assert torch.equal(a.table, b.table)


def _symlink_entry():
    info = zipfile.ZipInfo("adapter_config.json")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # building the duplicate-entry zip
@pytest.mark.parametrize(
    "case, needle",
    [
        ("traversal", "unsafe path"),
        ("absolute", "unsafe path"),
        ("backslash", "unsafe path"),
        ("symlink", "symlink"),
        ("too_many", "entries"),
        ("bomb_ratio", "compression ratio"),
        ("too_big", "expand to"),
        ("duplicate", "duplicate"),
        ("not_zip", "not a valid zip"),
        ("missing", "missing adapter_config.json"),
    ],
)
def test_zip_rejects_hostile_archives(bases, case, needle):
    data = {
        "traversal": lambda: _zip([("../adapter_config.json", b"{}")]),
        "absolute": lambda: _zip([("/tmp/adapter_config.json", b"{}")]),
        "backslash": lambda: _zip([("..\\adapter_config.json", b"{}")]),
        "symlink": lambda: _zip([_symlink_entry()]),
        "too_many": lambda: _zip([(f"f{i}.txt", b"x") for i in range(20)]),
        "bomb_ratio": lambda: _zip([("adapter_model.safetensors", b"\x00" * (4 << 20))]),
        "too_big": lambda: _zip([("adapter_model.safetensors", os.urandom(300 << 10))], zipfile.ZIP_STORED),
        "duplicate": lambda: _zip([("adapter_config.json", b"{}"), ("adapter_config.json", b"{}")]),
        "not_zip": lambda: b"PK\x03\x04 definitely not a zip",
        "missing": lambda: _zip([("README.md", b"hi")]),
    }[case]()
    limits = ZipLimits(max_total_uncompressed=256 << 10) if case == "too_big" else None
    with pytest.raises(AdapterFormatError, match=needle):
        import_peft_zip(data, bases["gpt2"], limits=limits)


def test_read_zip_checks_actual_size_against_header():
    data = bytearray(_zip([("adapter.json", b"{}" * 100)], zipfile.ZIP_STORED))
    # corrupt the stored bytes: CRC check on read must turn into AdapterFormatError
    i = data.index(b"{}{}")
    data[i] = ord("[")
    with pytest.raises(AdapterFormatError, match="cannot read"):
        read_zip_safely(bytes(data), ("adapter.json",))
