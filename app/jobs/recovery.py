"""What the monitor repairs after a process died mid-request (see `app.jobs.monitor`).

- Files left `uploaded`: the replica that accepted an upload validates it after the response; if
  it dies first, nobody else would until an API restarts. A file still `uploaded`
  `FILE_VALIDATION_GRACE_S` after its upload is claimed with a compare-and-set on
  `files.validation_claimed_at` and validated by whichever monitor won the claim. A claim older
  than the grace period counts as lost (its claimer died too) and can be taken again.
- Orphan blobs: a blob is stored before the row that names it is committed, so a crash in
  between leaves a blob that no row refers to, and a crash mid-write leaves a half-written upload
  (`.tmp/.put-*` locally, an unfinished multipart upload on S3). Both are deleted once older than
  `ORPHAN_BLOB_GRACE_S`. The grace period is what keeps a blob being written now, whose row is
  not committed yet, from being taken for an orphan.

A blob counts as referenced when a `*blob_key` column of any table holds its key, or a prefix of
it (bases and checkpoints are stored as directories), or it is under the checkpoint prefix
`checkpoints/{tenant}/{job}/` of a job that is not finished (its next worker resumes from there,
and the newest checkpoint's row is written only after its upload). Only keys under the service's
own kinds (`SWEPT_KINDS`) are considered, so a bucket shared with other data is safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace

from sqlalchemy import Column, or_, select, update

from app.jobs import state
from app.store.models import Base, File, Job

log = logging.getLogger("prefixd.jobs.recovery")

UPLOAD_PURPOSES = ("fine-tune", "base-train", "evals")  # the purposes an upload validates (app.api.files)
RECOVER_BATCH = 20  # files validated per monitor pass; the rest wait for the next one
SWEPT_KINDS = ("files", "adapters", "checkpoints", "bases")
_LOOKUP_BATCH = 50  # blob keys per database lookup (each one also looks up its ancestors)


# ----------------------------------------------------------------------------- stuck uploads


def recover_uploaded_files(ctx, validate: Callable[[str], None] | None = None,
                           now: float | None = None) -> list[str]:
    """Claim files left `uploaded` past the grace period and validate them; returns their ids."""
    t = time.time() if now is None else now
    cutoff = t - ctx.settings.file_validation_grace_s
    unclaimed = or_(File.validation_claimed_at.is_(None), File.validation_claimed_at < cutoff)
    claimed: list[str] = []
    with ctx.session_factory() as s:
        ids = s.scalars(select(File.id).where(
            File.status == "uploaded", File.purpose.in_(UPLOAD_PURPOSES), File.created_at < cutoff, unclaimed,
        ).order_by(File.created_at).limit(RECOVER_BATCH)).all()
        for file_id in ids:
            res = s.execute(update(File).where(File.id == file_id, File.status == "uploaded", unclaimed)
                            .values(validation_claimed_at=t).execution_options(synchronize_session=False))
            if res.rowcount == 1:
                claimed.append(file_id)
        s.commit()
    if claimed:
        log.warning("validating %d file(s) left uploaded for over %g s (their replica died?): %s",
                    len(claimed), ctx.settings.file_validation_grace_s, ", ".join(claimed))
        validate = validate or file_validator(ctx)
        for file_id in claimed:
            validate(file_id)
    return claimed


def file_validator(ctx) -> Callable[[str], None]:
    """`app.api.files.validate_file` on the app in `ctx.extra["app"]` (an API process: it counts
    tokens with the served tokenizer), else on a view of the context (a worker: estimated)."""
    from app.api.files import validate_file

    app = ctx.extra.get("app") or SimpleNamespace(state=SimpleNamespace(
        settings=ctx.settings, session_factory=ctx.session_factory, blobs=ctx.blobs, serving=None))
    return lambda file_id: validate_file(app, file_id)


# ----------------------------------------------------------------------------- orphan blobs


def blob_key_columns() -> list[Column]:
    """Every column that stores a blob key or prefix; a new one must be named `*blob_key`."""
    return [c for t in Base.metadata.sorted_tables for c in t.columns
            if c.name == "blob_key" or c.name.endswith("_blob_key")]


def _ancestors(key: str) -> set[str]:
    """The values that would protect `key`: itself and every directory above it, with and
    without its trailing slash."""
    out = {key}
    parts = key.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        out.update((d, d + "/"))
    return out


def referenced(session, keys: list[str]) -> set[str]:
    """The subset of `keys` that some row refers to."""
    wanted = {k: _ancestors(k) for k in keys}
    candidates = set().union(*wanted.values()) if wanted else set()
    held: set[str] = set()
    for col in blob_key_columns():
        held.update(session.scalars(select(col).where(col.in_(sorted(candidates)))))
    protected = {v for v in held if v} | {v.rstrip("/") + "/" for v in held if v}
    out = {k for k, anc in wanted.items() if anc & protected}
    # checkpoints/{tenant}/{job}/...: a job not finished may resume from any of them
    ckpt = {k: k.split("/")[2] for k in keys if k.startswith("checkpoints/") and k.count("/") >= 3}
    if ckpt:
        active = set(session.scalars(select(Job.id).where(Job.id.in_(sorted(set(ckpt.values()))),
                                                          Job.status.in_(state.ACTIVE))))
        out.update(k for k, job_id in ckpt.items() if job_id in active)
    return out


def _batches(items: Iterable, n: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def sweep_orphan_blobs(session_factory, blobs, grace_s: float, now: float | None = None) -> list[str]:
    """Delete blobs older than `grace_s` that no row refers to, and half-written uploads as old;
    returns the keys deleted. The rows are read after the listing: a row committed meanwhile names
    a blob the listing saw as older than the grace period, which is what the period rules out."""
    if grace_s <= 0:
        return []
    cutoff = (time.time() if now is None else now) - grace_s
    deleted: list[str] = []
    old = (k for kind in SWEPT_KINDS for k, mtime in blobs.iter_with_mtime(kind + "/") if mtime < cutoff)
    for batch in _batches(old, _LOOKUP_BATCH):
        with session_factory() as s:
            keep = referenced(s, batch)
        for key in batch:
            if key not in keep:
                blobs.delete(key)
                deleted.append(key)
    temp = blobs.sweep_temp(cutoff)
    if deleted or temp:
        log.warning("deleted %d orphan blob(s) and %d half-written upload(s) older than %g s%s",
                    len(deleted), temp, grace_s, (": " + ", ".join(deleted[:10])) if deleted else "")
    return deleted


def sweep_interval_s(settings) -> float:
    """How often a monitor sweeps: a quarter of the grace period (an orphan lives at most 1.25
    times it), and never more often than the monitor runs."""
    return max(settings.job_monitor_interval_s, settings.orphan_blob_grace_s / 4)


def maybe_sweep_orphans(ctx, now: float | None = None) -> list[str] | None:
    """`sweep_orphan_blobs` when this context's last sweep is `sweep_interval_s` old; else None."""
    settings = ctx.settings
    if settings.orphan_blob_grace_s <= 0:
        return None
    t = time.monotonic() if now is None else now
    if t < ctx.extra.get("next_orphan_sweep", 0.0):
        return None
    ctx.extra["next_orphan_sweep"] = t + sweep_interval_s(settings)
    return sweep_orphan_blobs(ctx.session_factory, ctx.blobs, settings.orphan_blob_grace_s)
