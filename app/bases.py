"""Base models as service resources: register a local HF directory, fetch it back, and make sure
the service has a base to serve on first start.

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
- `ensure_default_base` is what the API runs at startup (in a background thread):
  `BASE_MODEL=/path` serves that directory, registered under `slugify(dir name)`; without it the
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

from app.ml.callbacks import TrainingCallbacks
from app.store.models import ModelRecord

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


def _fingerprint_of(local_dir: Path) -> str:
    from app.ml.base import load_base

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
    from app.ml.base import resolve_device
    from app.ml.config import BaseTrainingConfig
    from app.ml.pretrain import build_default_base

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


def served_base_dir(settings) -> tuple[str, Path]:
    """(base id, local dir) of the base this process serves at startup (may not exist yet)."""
    if settings.base_model:
        path = Path(settings.base_model).resolve()
        return slugify(path.name), path
    return DEFAULT_BASE_ID, Path(settings.resolved_base_model).resolve()


def ensure_default_base(settings, session, blobs, *, fingerprint: str | None = None) -> ModelRecord:
    """Make sure the startup base exists locally and has its ModelRecord; commits.

    `fingerprint` (of the loaded base) saves loading the model once more to compute it."""
    slug, path = served_base_dir(settings)
    record = session.get(ModelRecord, slug)
    if not _complete_local(path):
        if settings.base_model:
            raise FileNotFoundError(f"BASE_MODEL={settings.base_model} is not a Hugging Face model directory")
        if record is not None and record.kind == "base":
            try:
                materialize_base(settings, blobs, record)
            except FileNotFoundError:
                _build_default(path, settings.default_base_build_steps, settings.device)
        else:
            _build_default(path, settings.default_base_build_steps, settings.device)
    if fingerprint is None and (record is None or record.details.get("local_path") != str(path)):
        fingerprint = _fingerprint_of(path)
    if record is not None and record.kind == "base" and (fingerprint is None or record.fingerprint == fingerprint):
        if (record.details or {}).get("local_path") != str(path):
            record.details = {**(record.details or {}), "local_path": str(path)}
            session.commit()
        return record
    if record is not None and record.fingerprint != fingerprint:
        log.warning("base %s changed on disk (fingerprint %s -> %s); re-registering",
                    slug, record.fingerprint[:12], (fingerprint or "")[:12])
    try:
        record = register_base(session, blobs, path, slug, None, fingerprint=fingerprint,
                               details={"source": "BASE_MODEL" if settings.base_model else "built-in"})
        session.commit()
    except IntegrityError:  # another replica registered it at the same moment
        session.rollback()
        record = session.get(ModelRecord, slug)
    return record
