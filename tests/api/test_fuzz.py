"""Hypothesis harnesses: the dataset validator and the adapter zip import, on random bytes and on
mutations of valid inputs. No crash (only the documented error types), and every reject is a
clear, non-empty error message. Each harness stays well under 20 s on 2 CPUs.

Found by these harnesses (fixed in app/ml/adapter.py): a corrupt deflate stream (zlib.error), a
mangled header offset (ValueError: negative seek), an unknown zip version (NotImplementedError from
the ZipFile constructor), and a deeply nested adapter_config.json (RecursionError) all escaped as
other exceptions than AdapterFormatError, which the import route answers with a 500.
"""

from __future__ import annotations

import io
import json
import re
import types
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.files.validation import validate_dataset
from app.ml.adapter import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    Adapter,
    AdapterFormatError,
    ZipLimits,
    _zip_files,
    export_peft_zip,
    import_peft_zip,
    read_zip_safely,
)
from app.ml.prefix import PrefixConfig

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ dataset validator

REASONS = re.compile(
    r"^line (\d+): ("
    r"not UTF-8|too long \(\d+ bytes, limit \d+\)|not JSON|not a JSON object|"
    r'missing field "[^"]+"( \(expected .*\))?|field "[^"]+" must be a (string|non-empty list)|'
    r"empty completion|empty text|messages\[\d+\] must be an object|messages\[\d+\]\.role must be one of .+|"
    r"the last message must be from the assistant|too many rows \(limit \d+\))$"
)


def check_result(res, data: bytes, max_line_bytes: int) -> None:
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert res.rows >= 0 and res.tokens >= 0 and res.error_count >= len(res.errors)
    if res.ok:
        assert res.rows > 0 and res.error_count == 0 and res.details is None
        return
    details = res.details
    assert isinstance(details, str) and details.strip()
    for err in res.errors:
        m = REASONS.match(err)
        assert m, f"unclear reject: {err!r}"
        assert 1 <= int(m.group(1)) <= n_lines
    if res.error_count == 0:
        assert details == "file is empty: no examples found"
    else:
        assert details.startswith(f"{res.error_count} bad line")


def _validate(data: bytes, purpose: str, fmt: str, max_line_bytes: int, chunks=None):
    stream = io.BytesIO(data) if chunks is None else chunks
    return validate_dataset(stream, purpose, fmt, max_line_bytes=max_line_bytes, max_errors=5)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


PURPOSE_FMT = st.sampled_from([("fine-tune", "jsonl"), ("base-train", "jsonl"), ("base-train", "text")])


@FUZZ
@given(data=st.binary(max_size=4096), pf=PURPOSE_FMT, max_line=st.integers(1, 512),
       cuts=st.lists(st.integers(0, 4096), max_size=6))
def test_validator_random_bytes(data, pf, max_line, cuts):
    res = _validate(data, *pf, max_line)
    check_result(res, data, max_line)
    # however the bytes arrive (chunk boundaries anywhere, even inside a UTF-8 char or a CRLF), same answer
    again = _validate(data, *pf, max_line, chunks=_split(data, cuts))
    assert (again.ok, again.rows, again.tokens, again.errors, again.error_count) == \
           (res.ok, res.rows, res.tokens, res.errors, res.error_count)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(
    _json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "bot", 1]),
        "content": st.one_of(st.text(max_size=20), _json),
    },
)
_record = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.one_of(st.text(max_size=30), _json),
            "completion": st.one_of(st.text(max_size=30), _json),
        },
    ),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(_message, max_size=4), _json)}),
    st.fixed_dictionaries({}, optional={"text": st.one_of(st.text(max_size=30), _json)}),
    _json,
)
_line = st.one_of(
    _record.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"\r", b"\xef\xbb\xbf{}", b"[" * 3000, b'{"prompt": "a"']),
)


@FUZZ
@given(lines=st.lists(_line, max_size=12), pf=PURPOSE_FMT, crlf=st.booleans(), max_line=st.integers(8, 8192))
def test_validator_structured_lines(lines, pf, crlf, max_line):
    data = (b"\r\n" if crlf else b"\n").join(lines)
    res = _validate(data, *pf, max_line)
    check_result(res, data, max_line)


def test_validator_deep_nesting_and_long_lines():
    for data in (b"[" * 60000 + b"\n", b'{"prompt": ' + b"[" * 50000 + b"}\n", b"x" * 200000):
        for pf in (("fine-tune", "jsonl"), ("base-train", "jsonl"), ("base-train", "text")):
            res = _validate(data, *pf, 64 * 1024)
            check_result(res, data, 64 * 1024)


# ------------------------------------------------------------------ zip import

BASE = types.SimpleNamespace(
    fingerprint="fp-fuzz", geometry=types.SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=8)
)
LIMITS = ZipLimits(max_archive_bytes=1 << 20, max_total_uncompressed=2 << 20, max_entries=8, max_ratio=100.0)


def _valid_zip(P: int = 3) -> bytes:
    g = BASE.geometry
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    table = torch.randn(P, cfg.table_width, generator=torch.Generator().manual_seed(P))
    return export_peft_zip(Adapter.from_table(table, cfg, "x"))


VALID = _valid_zip()


def expect_clean(fn, *args):
    """`fn` returns, or raises AdapterFormatError with a clear message; nothing else escapes."""
    try:
        return fn(*args)
    except AdapterFormatError as e:
        msg = str(e)
        assert msg.strip() and len(msg) < 2000, msg
        return None


def test_valid_zip_imports():
    adapter = import_peft_zip(VALID, BASE, LIMITS)
    assert adapter.num_virtual_tokens == 3 and adapter.base_fingerprint == "fp-fuzz"


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b),
        st.binary(max_size=64).map(lambda b: b + b"PK\x05\x06" + bytes(18)),
    )
)
def test_zip_random_bytes(data):
    expect_clean(read_zip_safely, data, (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE), LIMITS)
    expect_clean(import_peft_zip, data, BASE, LIMITS)


_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.integers(1, 64)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        pos = min(pos, len(b) - 1) if b else 0
        if not b:
            break
        if kind == "set":
            b[pos] = val
        elif kind == "flip":
            b[pos] ^= 1 << val
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([val])
        else:
            del b[pos : pos + val]
    return bytes(b)


@FUZZ
@given(ops=st.lists(_mutation, min_size=1, max_size=4))
def test_zip_mutated_valid(ops):
    data = mutate(VALID, ops)
    adapter = expect_clean(import_peft_zip, data, BASE, LIMITS)
    if adapter is not None:  # survived the mutation: then it is a well-formed adapter for BASE
        assert adapter.num_virtual_tokens >= 1 and bool(torch.isfinite(adapter.table).all())


_config_value = st.one_of(_json, st.integers(-3, 300))


@FUZZ
@given(
    cfg=st.dictionaries(
        st.sampled_from(
            [
                "peft_type",
                "task_type",
                "num_virtual_tokens",
                "num_layers",
                "num_attention_heads",
                "token_dim",
                "num_transformer_submodules",
            ]
        ),
        _config_value,
        max_size=7,
    ),
    keep_good=st.booleans(),
    weights=st.one_of(st.none(), st.binary(max_size=256)),
    extra=st.dictionaries(
        st.sampled_from(["README.md", "../evil", "/abs", "a\\b", "adapter_model.bin", "d/"]),
        st.binary(max_size=32),
        max_size=2,
    ),
)
def test_zip_mutated_members(cfg, keep_good, weights, extra):
    """Well-formed zips whose members are hostile: config fields, weights bytes, extra/unsafe names."""
    with zipfile.ZipFile(io.BytesIO(VALID)) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    base_cfg = json.loads(files[PEFT_CONFIG_FILE]) if keep_good else {}
    files[PEFT_CONFIG_FILE] = json.dumps({**base_cfg, **cfg}).encode()
    if weights is not None:
        files[PEFT_WEIGHTS_FILE] = weights
    files.update(extra)
    data = _zip_files(files, zipfile.ZIP_DEFLATED)
    expect_clean(import_peft_zip, data, BASE, LIMITS)


@pytest.mark.parametrize(
    "config", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"\xff\xfe", b"null", b"1e999999"]
)
def test_zip_hostile_config_json(config):
    with zipfile.ZipFile(io.BytesIO(VALID)) as zf:
        weights = zf.read(PEFT_WEIGHTS_FILE)
    data = _zip_files({PEFT_CONFIG_FILE: config, PEFT_WEIGHTS_FILE: weights}, zipfile.ZIP_STORED)
    with pytest.raises(AdapterFormatError, match=PEFT_CONFIG_FILE):
        import_peft_zip(data, BASE, LIMITS)
