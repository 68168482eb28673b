"""Base models as service resources: register a local HF directory or GGUF file, fetch it back,
and make sure the service has a base to serve on first start.

- A base id is a slug, `[a-z0-9-]` (`slugify` turns a directory name into one).
- `register_base` uploads every file of the directory to blobs under `bases/{slug}/`, then writes
  `bases/{slug}/_manifest.json` last: a base whose manifest is missing is an upload that did not
  finish, and is never materialised. It upserts the `ModelRecord` (kind `base`; `tenant_id` NULL
  for the service's own bases, the owner's id for a tenant's base job). Its two halves,
  `upload_base` and `record_base`, let a base job upload first and write the record in the same
  transaction as its success.
- `materialize_base` returns a local directory for a record: the directory it was registered from
  when it still exists on this machine (`details.local_path`), else `DATA_DIR/models/{slug}`,
  downloaded once into a temp dir and renamed into place (atomic: a crash leaves no half base).
- A GGUF file is never served as such: `app.ml.gguf` converts it once into a float HF directory,
  `DATA_DIR/models/{slug}`, which is then registered like any other base (its record's details
  keep the GGUF's path and sha256). Workers and other replicas download that directory from blobs
  and never convert; a replica started with the same GGUF as BASE_MODEL downloads it too.
- `register_source` is the admin route's (`POST /v1/admin/bases`): a server-side directory or
  GGUF checked, converted if need be, loaded once (its fingerprint) and registered; bad input is a
  `BaseSourceError` naming the path and why, an id already registered with other weights a
  `BaseIdTaken`. Registering never changes the served base.
- `ensure_default_base` is what the API runs at startup (in a background thread):
  `BASE_MODEL=/path` serves that directory or GGUF file, registered under `BASE_MODEL_ID`, else
  `slugify` of the directory's name or the file's stem; without it the
  service serves `DATA_DIR/models/default`, which it materialises from blobs if another replica
  already built it, and otherwise builds offline with `app.ml.pretrain.build_default_base`
  (`DEFAULT_BASE_BUILD_STEPS` shortens that build, e.g. for tests), checkpointing under
  `DATA_DIR/models/.default-build/` so that a build killed midway resumes on the next start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from app.ml.base import load_base, resolve_device
from app.ml.callbacks import TrainingCallbacks
from app.ml.config import BaseTrainingConfig
from app.ml.gguf import GGUFError, check_gguf, convert_gguf, converted_from, gguf_sha256, is_gguf_path, mark_converted
from app.ml.pretrain import build_default_base
from app.store.tables import ModelRecord

log = logging.getLogger("prefixd.bases")

DEFAULT_BASE_ID = "default"
MANIFEST = "_manifest.json"
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_FILE_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)[:64].strip("-")
    return s or "base"


def is_slug(value: str) -> bool:
    return bool(SLUG_RE.match(value or ""))


def blob_prefix(slug: str) -> str:
    return f"bases/{slug}/"


def _dir_files(local_dir: Path) -> list[str]:
    out = []
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(local_dir).as_posix()
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):  # caches, temp files
            continue
        if not all(_FILE_RE.match(p) for p in parts):
            raise ValueError(f"base file name not storable: {rel!r}")
        out.append(rel)
    return out


class BaseSourceError(ValueError):
    """A path that cannot become a base; the message names it and says why."""

    def __init__(self, message: str, param: str = "path"):
        super().__init__(message)
        self.param = param


class BaseIdTaken(ValueError):
    """A base id already registered with other weights (or taken by an adapter)."""


_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def _fingerprint_of(local_dir: Path) -> str:
    return load_base(str(local_dir)).fingerprint


@dataclass(frozen=True)
class BaseUpload:
    """A base directory's files in blobs, manifest last: what a ModelRecord of kind `base` points at."""

    prefix: str
    fingerprint: str
    size_bytes: int
    local_dir: Path


def upload_base(blobs, local_dir, prefix: str, fingerprint: str | None = None) -> BaseUpload:
    """Upload every file of the HF directory `local_dir` under `prefix`, then its manifest."""
    local_dir = Path(local_dir).resolve()
    if not (local_dir / "config.json").is_file():
        raise FileNotFoundError(f"{local_dir} is not a Hugging Face model directory (no config.json)")
    if fingerprint is None:
        fingerprint = _fingerprint_of(local_dir)
    files = _dir_files(local_dir)
    size = 0
    for rel in files:
        blobs.put_file(prefix + rel, local_dir / rel)
        size += (local_dir / rel).stat().st_size
    manifest = {"fingerprint": fingerprint, "files": files, "size_bytes": size}
    blobs.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=2).encode())
    return BaseUpload(prefix, fingerprint, size, local_dir)


def record_base(session, slug: str, upload: BaseUpload, owner_tenant_id: str | None = None, *,
                job_id: str | None = None, details: dict | None = None) -> ModelRecord:
    """Upsert the ModelRecord of base `slug` for an upload (flushed; the caller commits)."""
    if not is_slug(slug):
        raise ValueError(f"base id must be a slug of [a-z0-9-], got {slug!r}")
    record = session.get(ModelRecord, slug)
    if record is not None and (record.kind != "base" or record.tenant_id != owner_tenant_id):
        raise ValueError(f"model id {slug!r} is already taken")
    info = {"local_path": str(upload.local_dir), **(details or {})}
    if record is None:
        record = ModelRecord(
            id=slug, kind="base", tenant_id=owner_tenant_id, base_id=None, fingerprint=upload.fingerprint,
            blob_key=upload.prefix, job_id=job_id, size_bytes=upload.size_bytes, details=info,
        )
        session.add(record)
    else:
        record.fingerprint, record.blob_key, record.size_bytes = upload.fingerprint, upload.prefix, upload.size_bytes
        record.details = {**(record.details or {}), **info}
        if job_id:
            record.job_id = job_id
    session.flush()
    return record


def register_base(
    session,
    blobs,
    local_dir,
    slug: str,
    owner_tenant_id: str | None = None,
    *,
    fingerprint: str | None = None,
    job_id: str | None = None,
    details: dict | None = None,
) -> ModelRecord:
    """Upload `local_dir` under `bases/{slug}/` and upsert its ModelRecord (the caller commits)."""
    if not is_slug(slug):
        raise ValueError(f"base id must be a slug of [a-z0-9-], got {slug!r}")
    upload = upload_base(blobs, local_dir, blob_prefix(slug), fingerprint)
    return record_base(session, slug, upload, owner_tenant_id, job_id=job_id, details=details)


def _complete_local(path: Path) -> bool:
    return (path / "config.json").is_file()


def materialize_base(settings, blobs, record: ModelRecord) -> Path:
    """A local directory holding the base `record`, downloading it at most once."""
    local = (record.details or {}).get("local_path")
    if local and _complete_local(Path(local)):
        return Path(local)
    target = Path(settings.data_dir).resolve() / "models" / record.id
    if _complete_local(target):
        return target
    prefix = record.blob_key or blob_prefix(record.id)
    try:
        manifest = json.loads(blobs.get_bytes(prefix + MANIFEST))
    except KeyError:
        raise FileNotFoundError(f"base {record.id!r} has no complete upload in storage") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{record.id}-", dir=target.parent))
    try:
        for rel in manifest["files"]:
            if not all(_FILE_RE.match(p) for p in rel.split("/")):
                raise ValueError(f"unsafe file name in base manifest: {rel!r}")
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            blobs.download_to(prefix + rel, dest)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            if not _complete_local(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Next to the built base (DATA_DIR/models/default): the first-start build's checkpoints, and the
# lock that keeps two processes sharing a DATA_DIR from building (and checkpointing) at once.
BUILD_CHECKPOINT_DIR = ".default-build"
BUILD_LOCK_FILE = ".default-build.lock"


class _BuildLog(TrainingCallbacks):
    """Logs the first-start build's progress at each checkpoint (about every tenth of the build)."""

    def __init__(self):
        self.checkpointed = None

    def on_checkpoint(self, step, metrics):
        self.checkpointed = step  # the step's progress report follows

    def on_progress(self, progress):
        if progress.step == self.checkpointed:
            log.info("default base build: step %d of %d checkpointed (train loss %.3f, about %.0f s left)",
                     progress.step, progress.total_steps, progress.train_loss, progress.eta_s)


@contextmanager
def _exclusive(lock_path: Path):
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
        yield
    finally:
        os.close(fd)


def _build_default(target: Path, steps: int | None = None, device: str = "auto") -> None:
    """Build the engine's default base into `target`, atomically, on `device` (DEVICE); `steps`
    (DEFAULT_BASE_BUILD_STEPS) overrides the preset's step count.

    The build checkpoints into `target.parent/.default-build/`; a build killed midway (Ctrl-C, OOM,
    a deploy) resumes from there on the next start with the same final weights, and the checkpoints
    are deleted once the base is in place."""

    target.parent.mkdir(parents=True, exist_ok=True)
    ckpt = target.parent / BUILD_CHECKPOINT_DIR
    with _exclusive(target.parent / BUILD_LOCK_FILE):
        if _complete_local(target):  # another process sharing this DATA_DIR built it meanwhile
            return
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-default-", dir=target.parent))
        try:
            log.info("no base model: building the default base into %s (first start only%s; checkpoints in %s)",
                     target, "" if steps is None else f", {steps} steps", ckpt)
            build_default_base(str(tmp), config=None if steps is None else BaseTrainingConfig(steps=steps),
                               callbacks=_BuildLog(), checkpoint_dir=ckpt, device=resolve_device(device))
            try:
                os.rename(tmp, target)
            except OSError:
                if not _complete_local(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)


def _gguf_source(settings) -> Path | None:
    if settings.base_model and is_gguf_path(settings.base_model):
        return Path(settings.base_model).resolve()
    return None


def converted_dir(settings, slug: str) -> Path:
    """Where the float HF conversion of a GGUF registered as `slug` lives on this machine."""
    return Path(settings.data_dir).resolve() / "models" / slug


def served_base_dir(settings) -> tuple[str, Path]:
    """(base id, local dir) of the base this process serves at startup (may not exist yet); for a
    GGUF BASE_MODEL, the directory it is converted into."""
    if settings.base_model:
        path = Path(settings.base_model).resolve()
        gguf = _gguf_source(settings)
        slug = getattr(settings, "base_model_id", None) or slugify(path.stem if gguf else path.name)
        if not is_slug(slug):
            raise ValueError(f"BASE_MODEL_ID must be a slug of [a-z0-9-], got {slug!r}")
        return slug, (converted_dir(settings, slug) if gguf else path)
    return DEFAULT_BASE_ID, Path(settings.resolved_base_model).resolve()


def _ensure_converted(settings, blobs, src: Path, path: Path, record: ModelRecord | None) -> tuple[str, bool]:
    """Make `path` the float conversion of the GGUF `src`; returns the GGUF's sha256 and whether
    it converted now (the weights may then differ from the record's).

    Converted once: kept while it matches the file, downloaded from blobs when another replica
    already registered this very GGUF under this id, else converted here."""

    check_gguf(src)
    sha = gguf_sha256(src)
    if _complete_local(path) and converted_from(path) == sha:
        return sha, False
    if (not _complete_local(path) and record is not None and record.kind == "base"
            and (record.details or {}).get("gguf_sha256") == sha):
        try:
            materialize_base(settings, blobs, record)
        except FileNotFoundError:
            pass  # the upload is gone: convert again
        if _complete_local(path):
            mark_converted(path, src, sha)
            return sha, False
    log.info("converting GGUF %s into %s (once)", src, path)
    convert_gguf(src, path, sha)
    return sha, True


def ensure_default_base(settings, session, blobs, *, fingerprint: str | None = None) -> ModelRecord:
    """Make sure the startup base exists locally and has its ModelRecord; commits.

    `fingerprint` (of the loaded base) saves loading the model once more to compute it."""
    slug, path = served_base_dir(settings)
    record = session.get(ModelRecord, slug)
    gguf = _gguf_source(settings)
    details = {"source": "BASE_MODEL" if settings.base_model else "built-in"}
    converted = False
    if gguf is not None:
        sha, converted = _ensure_converted(settings, blobs, gguf, path, record)
        details.update(gguf=str(gguf), gguf_sha256=sha)
    elif not _complete_local(path):
        if settings.base_model:
            raise FileNotFoundError(f"BASE_MODEL={settings.base_model} is not a Hugging Face model directory "
                                    "nor a .gguf file")
        if record is not None and record.kind == "base":
            try:
                materialize_base(settings, blobs, record)
            except FileNotFoundError:
                _build_default(path, settings.default_base_build_steps, settings.device)
        else:
            _build_default(path, settings.default_base_build_steps, settings.device)
    if fingerprint is None and (converted or record is None or record.details.get("local_path") != str(path)):
        fingerprint = _fingerprint_of(path)
    if record is not None and record.kind == "base" and (fingerprint is None or record.fingerprint == fingerprint):
        if gguf is not None:
            details["local_path"] = str(path)
        else:
            details = {"local_path": str(path)}
        if any((record.details or {}).get(k) != v for k, v in details.items()):
            record.details = {**(record.details or {}), **details}
            session.commit()
        return record
    if record is not None and record.fingerprint != fingerprint:
        log.warning("base %s changed on disk (fingerprint %s -> %s); re-registering",
                    slug, record.fingerprint[:12], (fingerprint or "")[:12])
    try:
        record = register_base(session, blobs, path, slug, None, fingerprint=fingerprint, details=details)
        session.commit()
    except IntegrityError:  # another replica registered it at the same moment
        session.rollback()
        record = session.get(ModelRecord, slug)
    return record


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise BaseSourceError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS):
        raise BaseSourceError(f"{path}: the directory has no weights (*.safetensors or *.bin)")


def register_source(settings, session, blobs, source: str, slug: str | None = None) -> tuple[ModelRecord, bool]:
    """Register the server-side HF directory or GGUF file `source` as service base `slug`
    (default: slug of the directory's name or the file's stem); commits.

    Returns (record, created). Registering the same weights under the same id again is a no-op
    (created False). Raises BaseSourceError for bad input, before anything is registered, and
    BaseIdTaken for an id already holding other weights: a registered base is never overwritten,
    since adapters and served replicas rely on its fingerprint."""

    try:
        raw = Path(str(source))
        if not raw.is_absolute():
            raise BaseSourceError(f"{source}: the path must be absolute (a path on the server)")
        src = raw.resolve()
        exists, is_file = src.exists(), src.is_file()
    except (OSError, ValueError) as e:  # an embedded NUL, a name too long, a loop of links
        if isinstance(e, BaseSourceError):
            raise
        raise BaseSourceError(f"{source!r}: not a usable path ({e})") from None
    if not exists:
        raise BaseSourceError(f"{src}: no such file or directory")
    if is_file and not is_gguf_path(src):
        raise BaseSourceError(f"{src}: neither a .gguf file nor a Hugging Face model directory")
    if slug is None:
        slug = slugify(src.stem if is_file else src.name)
    elif not is_slug(slug):
        raise BaseSourceError(f"base id must be a slug of [a-z0-9-], got {slug!r}", param="id")
    if slug == DEFAULT_BASE_ID:  # the built-in base: BASE_MODEL-less replicas build and serve it
        raise BaseIdTaken(f"the base id {slug!r} is reserved for the built-in base")
    record = session.get(ModelRecord, slug)
    if record is not None and (record.kind != "base" or record.tenant_id is not None):
        raise BaseIdTaken(f"the model id {slug!r} is already taken")

    if is_file:
        try:
            check_gguf(src)
        except GGUFError as e:
            raise BaseSourceError(str(e)) from None
        sha = gguf_sha256(src)
        if record is not None:
            if (record.details or {}).get("gguf_sha256") == sha:
                return record, False
            raise BaseIdTaken(f"the base id {slug!r} is already registered with other weights")
        try:
            local = convert_gguf(src, converted_dir(settings, slug), sha)
        except GGUFError as e:
            raise BaseSourceError(str(e)) from None
        details = {"source": "admin", "gguf": str(src), "gguf_sha256": sha}
    else:
        try:
            _check_hf_dir(src)
        except PermissionError as e:
            raise BaseSourceError(f"{src}: not readable by the server ({e.strerror})") from None
        local, details = src, {"source": "admin"}
    try:
        fingerprint = _fingerprint_of(local)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for broken checkpoints
        raise BaseSourceError(f"{src}: cannot be loaded as a causal LM ({type(e).__name__}: {e})") from None
    if record is not None:
        if record.fingerprint == fingerprint:
            return record, False
        raise BaseIdTaken(f"the base id {slug!r} is already registered with other weights")
    try:
        record = register_base(session, blobs, local, slug, None, fingerprint=fingerprint, details=details)
        session.commit()
    except IntegrityError:  # registered by another request at the same moment
        session.rollback()
        record = session.get(ModelRecord, slug)
        if record is None or record.fingerprint != fingerprint:
            raise BaseIdTaken(f"the base id {slug!r} is already registered with other weights") from None
        return record, False
    log.info("registered base %s from %s (%s)", slug, src, fingerprint)
    return record, True
