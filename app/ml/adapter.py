"""The prefix adapter: what a finished prefix job stores, and what serving loads.

An adapter is the folded prefix table `[P, layers*2*kv_dim]` (float32, PEFT's layout, see
`app/ml/prefix.py`) plus self-describing metadata, nanoGPT-checkpoint style: the base fingerprint
it was trained on, its geometry, the training config and metrics. On disk it is two files:

- `adapter.safetensors`: one tensor, `prefix_table`;
- `adapter.json`: the metadata, plus `table_sha256` so a table and a JSON from different writes
  (a torn copy in a blob store) are caught instead of served.

Loading never unpickles: safetensors and JSON only, and every shape, dtype and value is checked
before an `Adapter` exists. Bad input raises `AdapterFormatError`; a valid adapter for another
base raises `AdapterMismatchError` from `check_compatible`.

PEFT interop: `export_peft` writes PEFT's prefix-tuning format (`adapter_config.json` +
`adapter_model.safetensors` with `prompt_embeddings`), which `PeftModel.from_pretrained` loads;
`import_peft` reads that format back. Uploaded zips go through `read_zip_safely`, which bounds sizes,
entry count and compression ratio, and refuses traversal, absolute names and symlinks.

Position convention (checked against peft 0.21.2): PEFT's forward prepends the prefix as a cache
and, when given `position_ids`, shifts them by P; without them, the model counts positions from the
cache length, so the first real token sits at P for unpadded rows (same as ours), but at
P + num_left_pads for left-padded rows (ours: P). Pass `position_ids = cumsum(mask) - 1` to PEFT
to get our convention on padded batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.ml.prefix import PrefixConfig, PrefixEncoder, table_to_key_values

FORMAT_VERSION = 1
TABLE_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
TABLE_TENSOR = "prefix_table"

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"

# Stored tables are float32; imports may arrive in half precision and are widened on load.
_ACCEPTED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_GEOMETRY_KEYS = ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim")
# Largest JSON we parse; real configs are ~1 KB, this just keeps a hostile file from eating memory.
_MAX_JSON_BYTES = 1 << 20
# Fixed zip timestamp so the same adapter always exports to the same bytes.
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


class AdapterFormatError(ValueError):
    """The bytes are not a valid adapter (or PEFT prefix adapter): bad JSON, tensor, shape, zip..."""


class AdapterMismatchError(ValueError):
    """A valid adapter that belongs to a different base model."""


@dataclass
class Adapter:
    config: PrefixConfig  # projection-free: the table is already folded
    table: torch.Tensor  # [P, num_layers * 2 * kv_dim], float32
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.config.prefix_projection:
            raise AdapterFormatError("an adapter holds a folded table; fold() the prefix before saving")
        try:
            self.config.validate()
        except ValueError as e:
            raise AdapterFormatError(f"invalid prefix geometry: {e}") from None
        expected = (self.config.num_virtual_tokens, self.config.table_width)
        if tuple(self.table.shape) != expected:
            raise AdapterFormatError(f"table shape {tuple(self.table.shape)} != expected {expected}")
        self.table = self.table.detach().to(torch.float32).contiguous()

    @classmethod
    def from_table(
        cls,
        table: torch.Tensor,
        config: PrefixConfig,
        base_fingerprint: str,
        *,
        training: dict | None = None,
        metrics: dict | None = None,
        source: str = "prefix-tuning",
        **extra: Any,
    ) -> Adapter:
        """A new adapter with complete metadata (what the training loop calls when it finishes)."""
        cfg = PrefixConfig(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            num_virtual_tokens=config.num_virtual_tokens,
        )
        meta = {
            "base_fingerprint": str(base_fingerprint),
            "training": dict(training or {}),
            "metrics": dict(metrics or {}),
            "source": source,
            "created_at": int(time.time()),
            **extra,
        }
        adapter = cls(cfg, table, meta)
        adapter.metadata.update(adapter._geometry_metadata())
        return adapter

    @classmethod
    def from_encoder(cls, encoder: PrefixEncoder, base_fingerprint: str, **kwargs: Any) -> Adapter:
        """Fold a (possibly reparameterised) prefix encoder into an adapter."""
        folded = encoder.fold() if encoder.config.prefix_projection else encoder
        return cls.from_table(folded().detach().cpu(), folded.config, base_fingerprint, **kwargs)

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint")

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def size_bytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def key_values(self, dtype: torch.dtype | None = None, device=None):
        """Per layer `(keys, values)`, each `[num_kv_heads, P, head_dim]`, for `batch_prefixes`."""
        table = self.table if device is None else self.table.to(device)
        return table_to_key_values(table, self.config, dtype)

    def _geometry_metadata(self) -> dict:
        c = self.config
        return {
            "num_virtual_tokens": c.num_virtual_tokens,
            "num_layers": c.num_layers,
            "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "dtype": "float32",
            "format_version": FORMAT_VERSION,
        }


# ---------------------------------------------------------------- native format: bytes


def serialize_adapter(adapter: Adapter) -> dict[str, bytes]:
    """`{file name: bytes}` for the two files of an adapter (for a blob store or a directory)."""
    if not isinstance(adapter.base_fingerprint, str) or not adapter.base_fingerprint:
        # Refuse here rather than write a file that `load_adapter` would reject later.
        raise AdapterFormatError("adapter has no base_fingerprint; it cannot be tied to a base")
    # One header metadata key only: safetensors keeps them in a hash map, so two keys come out in
    # random order and the same adapter would hash (and zip) differently on every save.
    table_bytes = st_save({TABLE_TENSOR: adapter.table.detach().cpu().contiguous()}, metadata={"format": "pt"})
    # Geometry always comes from the config, so the JSON can never disagree with the tensor.
    meta = {**adapter.metadata, **adapter._geometry_metadata()}
    meta["table_sha256"] = hashlib.sha256(table_bytes).hexdigest()
    meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
    return {TABLE_FILE: table_bytes, META_FILE: meta_bytes}


def deserialize_adapter(files: Mapping[str, bytes]) -> Adapter:
    """Inverse of `serialize_adapter`; validates everything, raises `AdapterFormatError`."""
    for name in (META_FILE, TABLE_FILE):
        if name not in files:
            raise AdapterFormatError(f"adapter is missing {name}")
    meta = _parse_json(files[META_FILE], META_FILE)

    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise AdapterFormatError(f"{META_FILE}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{META_FILE}: format_version {version} is newer than this code supports ({FORMAT_VERSION})"
        )
    if not isinstance(meta.get("base_fingerprint"), str) or not meta["base_fingerprint"]:
        raise AdapterFormatError(f"{META_FILE}: base_fingerprint must be a non-empty string")
    geo = {k: _positive_int(meta.get(k), k, META_FILE) for k in _GEOMETRY_KEYS}

    expected_sha = meta.pop("table_sha256", None)
    if expected_sha is not None and hashlib.sha256(files[TABLE_FILE]).hexdigest() != expected_sha:
        raise AdapterFormatError(
            f"{TABLE_FILE} does not match the table_sha256 in {META_FILE} (files from different writes?)"
        )

    tensor = _load_single_tensor(files[TABLE_FILE], TABLE_TENSOR, TABLE_FILE)
    dtype_name = _ACCEPTED_DTYPES.get(tensor.dtype)
    if dtype_name is None or meta.get("dtype") != dtype_name:
        raise AdapterFormatError(
            f"{TABLE_FILE}: tensor dtype {tensor.dtype} does not match dtype {meta.get('dtype')!r} in {META_FILE}"
        )
    config = PrefixConfig(geo["num_layers"], geo["num_kv_heads"], geo["head_dim"], geo["num_virtual_tokens"])
    _check_table(tensor, config, TABLE_FILE)
    meta["dtype"] = "float32"
    return Adapter(config, tensor.float(), meta)


def adapter_to_bytes(adapter: Adapter) -> bytes:
    """One blob: an uncompressed zip of the two files (tables do not compress)."""
    return _zip_files(serialize_adapter(adapter), zipfile.ZIP_STORED)


def adapter_from_bytes(data: bytes, limits: ZipLimits | None = None) -> Adapter:
    return deserialize_adapter(read_zip_safely(data, (META_FILE, TABLE_FILE), limits))


# ---------------------------------------------------------------- native format: directories


def save_adapter(adapter: Adapter, directory: str | os.PathLike) -> Path:
    """Write `adapter.safetensors` + `adapter.json` into `directory`, atomically.

    Both files are written and fsynced in a temp dir next to the target, which is then renamed
    into place, so a crash leaves either the old adapter, the new one, or a `.tmp` dir that no
    reader looks at: never a directory with one new file and one old or missing file.
    """
    return _write_dir_atomic(serialize_adapter(adapter), Path(directory))


def load_adapter(directory: str | os.PathLike) -> Adapter:
    """Read an adapter directory written by `save_adapter` (safetensors + JSON only)."""
    d = Path(directory)
    files = {}
    for name in (META_FILE, TABLE_FILE):
        try:
            files[name] = (d / name).read_bytes()
        except FileNotFoundError:
            raise AdapterFormatError(f"{d} is not an adapter directory: {name} is missing") from None
    return deserialize_adapter(files)


# ---------------------------------------------------------------- compatibility


def check_compatible(adapter: Adapter, base) -> None:
    """Raise `AdapterMismatchError` unless `adapter` was trained on `base` (same fingerprint and
    geometry). `base` needs `.fingerprint` and `.geometry` (an `app.ml.base.Base`)."""
    problems = []
    if adapter.base_fingerprint != base.fingerprint:
        problems.append(
            f"adapter was trained on base fingerprint {adapter.base_fingerprint!r}, "
            f"but the loaded base has fingerprint {base.fingerprint!r}"
        )
    geometry_problem = _geometry_mismatch(adapter.config, base.geometry)
    if geometry_problem:
        problems.append(geometry_problem)
    if problems:
        raise AdapterMismatchError("; ".join(problems))


def _geometry_mismatch(config: PrefixConfig, geometry) -> str | None:
    ours = (config.num_layers, config.num_kv_heads, config.head_dim)
    theirs = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    if ours == theirs:
        return None
    return (
        "geometry mismatch: adapter has (layers, kv_heads, head_dim) = "
        f"{ours}, base has {theirs}"
    )


# ---------------------------------------------------------------- PEFT interop


def peft_files(adapter: Adapter, base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """PEFT prefix-tuning files for `adapter`: what `PeftModel.from_pretrained` reads."""
    c = adapter.config
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": c.num_virtual_tokens,
        "num_layers": c.num_layers,
        # PEFT's GQA convention: the prefix has the key/value heads, token_dim = kv_heads * head_dim
        "token_dim": c.kv_dim,
        "num_attention_heads": c.num_kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": c.kv_dim,  # only used with prefix_projection, which a folded table has not
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
    }
    weights = st_save({PEFT_TENSOR: adapter.table.detach().cpu().contiguous()}, metadata={"format": "pt"})
    return {
        PEFT_CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        PEFT_WEIGHTS_FILE: weights,
    }


def export_peft(
    adapter: Adapter, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (atomically, like `save_adapter`)."""
    return _write_dir_atomic(peft_files(adapter, base_model_name_or_path), Path(out_dir))


def export_peft_zip(adapter: Adapter, base_model_name_or_path: str | None = None) -> bytes:
    return _zip_files(peft_files(adapter, base_model_name_or_path), zipfile.ZIP_DEFLATED)


def import_peft(source: str | os.PathLike | Mapping[str, bytes], base, **metadata: Any) -> Adapter:
    """Read a PEFT prefix-tuning adapter (a directory, or `{file name: bytes}`) for `base`.

    Only `adapter_config.json` and `adapter_model.safetensors` are read; a pickled
    `adapter_model.bin` is refused. The prefix must match `base.geometry`; the adapter gets
    `base.fingerprint` (a PEFT adapter records no fingerprint, only a free-form model name).
    """
    if isinstance(source, Mapping):
        files = source
    else:
        d = Path(source)
        files = {}
        for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
            try:
                files[name] = (d / name).read_bytes()
            except FileNotFoundError:
                pass
    if PEFT_CONFIG_FILE not in files:
        raise AdapterFormatError(f"PEFT adapter is missing {PEFT_CONFIG_FILE}")
    if PEFT_WEIGHTS_FILE not in files:
        raise AdapterFormatError(
            f"PEFT adapter is missing {PEFT_WEIGHTS_FILE} (pickled adapter_model.bin is not accepted; "
            "save with safe_serialization=True)"
        )
    cfg = _parse_json(files[PEFT_CONFIG_FILE], PEFT_CONFIG_FILE)

    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise AdapterFormatError(f"{PEFT_CONFIG_FILE}: peft_type is {cfg.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    if cfg.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise AdapterFormatError(f"{PEFT_CONFIG_FILE}: task_type is {cfg.get('task_type')!r}, expected 'CAUSAL_LM'")
    submodules = cfg.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise AdapterFormatError(
            f"{PEFT_CONFIG_FILE}: num_transformer_submodules={submodules} (encoder-decoder) is not supported"
        )
    P = _positive_int(cfg.get("num_virtual_tokens"), "num_virtual_tokens", PEFT_CONFIG_FILE)
    layers = _positive_int(cfg.get("num_layers"), "num_layers", PEFT_CONFIG_FILE)
    heads = _positive_int(cfg.get("num_attention_heads"), "num_attention_heads", PEFT_CONFIG_FILE)
    token_dim = _positive_int(cfg.get("token_dim"), "token_dim", PEFT_CONFIG_FILE)

    g = base.geometry
    if (layers, heads, token_dim) != (g.num_layers, g.num_kv_heads, g.num_kv_heads * g.head_dim):
        raise AdapterFormatError(
            f"{PEFT_CONFIG_FILE}: (num_layers, num_attention_heads, token_dim) = {(layers, heads, token_dim)} "
            f"does not fit the base, which needs {(g.num_layers, g.num_kv_heads, g.num_kv_heads * g.head_dim)} "
            "(num_attention_heads = key/value heads, token_dim = kv_heads * head_dim)"
        )

    tensor = _load_single_tensor(files[PEFT_WEIGHTS_FILE], PEFT_TENSOR, PEFT_WEIGHTS_FILE)
    if tensor.dtype not in _ACCEPTED_DTYPES:
        raise AdapterFormatError(f"{PEFT_WEIGHTS_FILE}: {PEFT_TENSOR} has unsupported dtype {tensor.dtype}")
    config = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    _check_table(tensor, config, PEFT_WEIGHTS_FILE)

    # PEFT saves prompt_encoder's *output*, so even prefix_projection=True arrives as a folded table.
    peft_info = {k: cfg.get(k) for k in ("base_model_name_or_path", "revision", "peft_version", "prefix_projection")}
    adapter = Adapter.from_table(
        tensor.float(), config, base.fingerprint, source="peft-import",
        peft=peft_info, source_dtype=_ACCEPTED_DTYPES[tensor.dtype], **metadata,
    )
    return adapter


def import_peft_zip(data: bytes, base, limits: ZipLimits | None = None, **metadata: Any) -> Adapter:
    """`import_peft` for an uploaded zip holding the two PEFT files at its root."""
    return import_peft(read_zip_safely(data, (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE), limits), base, **metadata)


# ---------------------------------------------------------------- safe zip reading


@dataclass(frozen=True)
class ZipLimits:
    """Bounds for reading an untrusted zip. Defaults fit an 80-layer, 8x128 kv-head, P=200 prefix."""

    max_archive_bytes: int = 512 << 20
    max_total_uncompressed: int = 512 << 20
    max_entries: int = 16
    # Float tables compress barely at all (~1.1x) and JSON ~4x; a bomb is 100x-1000x+.
    max_ratio: float = 100.0
    # Entries smaller than this skip the ratio check: they cannot be a bomb, and a tiny JSON of
    # repeated spaces may legitimately compress well.
    ratio_min_bytes: int = 64 << 10


# What the standard zipfile module raises on a corrupt archive: besides BadZipFile, a mangled header or
# stream surfaces as zlib.error (bad deflate data), ValueError (negative seek), NotImplementedError
# (unknown version or method), EOFError, struct.error... Each becomes an AdapterFormatError.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, RuntimeError, NotImplementedError,
               EOFError, OverflowError, zlib.error, struct.error)


def read_zip_safely(data: bytes, wanted: tuple[str, ...], limits: ZipLimits | None = None) -> dict[str, bytes]:
    """Return `{name: bytes}` for the `wanted` names found at the zip's root.

    Every entry must pass the checks (safe relative name, not a symlink, not encrypted, no
    duplicate, sizes within `limits`), or the whole archive is refused: one hostile entry means a
    hostile archive. Entries with other names (PEFT writes a README.md) are checked but never
    decompressed. Raises `AdapterFormatError`.
    """
    limits = limits or ZipLimits()
    if len(data) > limits.max_archive_bytes:
        raise AdapterFormatError(f"zip is {len(data)} bytes, over the limit of {limits.max_archive_bytes}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise AdapterFormatError(f"not a valid zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise AdapterFormatError(f"zip has {len(infos)} entries, over the limit of {limits.max_entries}")
        seen: set[str] = set()
        total = 0
        for info in infos:
            _check_zip_entry(info, limits)
            if info.filename in seen:
                raise AdapterFormatError(f"zip has a duplicate entry {info.filename!r}")
            seen.add(info.filename)
            total += info.file_size
        if total > limits.max_total_uncompressed:
            raise AdapterFormatError(
                f"zip would expand to {total} bytes, over the limit of {limits.max_total_uncompressed}"
            )
        out: dict[str, bytes] = {}
        for info in infos:
            if info.filename not in wanted:
                continue
            try:
                with zf.open(info) as f:
                    # Never trust the declared size: read at most one byte more than it.
                    blob = f.read(info.file_size + 1)
            except _ZIP_ERRORS as e:
                raise AdapterFormatError(f"cannot read {info.filename!r} from the zip: {e}") from None
            if len(blob) != info.file_size:
                raise AdapterFormatError(f"{info.filename!r} is not the size its zip header declares")
            out[info.filename] = blob
        return out


def _check_zip_entry(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.filename
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")  # Windows drive letter
        or ".." in path.parts
    ):
        raise AdapterFormatError(f"zip entry {name!r} has an unsafe path")
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):
        raise AdapterFormatError(f"zip entry {name!r} is a symlink")
    if info.flag_bits & 0x1:
        raise AdapterFormatError(f"zip entry {name!r} is encrypted")
    if info.file_size >= limits.ratio_min_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            raise AdapterFormatError(
                f"zip entry {name!r} has compression ratio {ratio:.0f}, over the limit of {limits.max_ratio:.0f}"
            )


def _zip_files(files: Mapping[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = compression
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, files[name])
    return buf.getvalue()


# ---------------------------------------------------------------- helpers


def _write_dir_atomic(files: Mapping[str, bytes], target: Path) -> Path:
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, blob in files.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if target.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first. A crash
            # in between leaves no target and two complete dirs, never a mixed one.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "d")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _parse_json(blob: bytes, name: str) -> dict:
    if len(blob) > _MAX_JSON_BYTES:
        raise AdapterFormatError(f"{name} is {len(blob)} bytes, too large for a config")
    try:
        value = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise AdapterFormatError(f"{name} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{name} must hold a JSON object, got {type(value).__name__}")
    return value


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _load_single_tensor(blob: bytes, tensor_name: str, where: str) -> torch.Tensor:
    try:
        tensors = st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFormatError(f"{where} is not a valid safetensors file: {e}") from None
    if set(tensors) != {tensor_name}:
        raise AdapterFormatError(f"{where} must hold exactly one tensor {tensor_name!r}, found {sorted(tensors)}")
    return tensors[tensor_name]


def _check_table(tensor: torch.Tensor, config: PrefixConfig, where: str) -> None:
    expected = (config.num_virtual_tokens, config.table_width)
    if tuple(tensor.shape) != expected:
        raise AdapterFormatError(
            f"{where}: table shape {tuple(tensor.shape)} != expected {expected} "
            f"[P, layers*2*kv_heads*head_dim] = [{config.num_virtual_tokens}, "
            f"{config.num_layers}*2*{config.num_kv_heads}*{config.head_dim}]"
        )
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise AdapterFormatError(f"{where}: table holds non-finite values (NaN or inf)")
