"""Jobs as the API sees them: create (with every reference checked), list, get, cancel, events,
checkpoints, and the OpenAI-shaped views. Every query is scoped by tenant; another tenant's job,
file or adapter is reported exactly as a missing one."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs import outbox, state
from app.jobs.spec import JobCreate, SpecError, check_limits, normalize_method, parse_job_create
from app.ml.config import PRESETS
from app.store.tables import File, Job, JobCheckpoint, JobEvent, ModelRecord, Tenant, new_id
from app.tenancy.quotas import check_adapter_count

log = logging.getLogger("prefixd.jobs")

MAX_PAGE = 100
# a new base trained from nothing names no existing model
SCRATCH = "scratch"
PURPOSE = {"prefix": "fine-tune", "base": "base-train"}


# ----------------------------------------------------------------------------- views


def job_public(job: Job) -> dict:
    kind = job.kind
    method = job.method or {"type": kind, kind: {}}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "status": job.status,
        "error": ({"code": job.error.get("code"), "message": job.error.get("message"),
                   "param": job.error.get("param")} if job.error else None),
        "hyperparameters": job.hyperparameters or {},
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "result_files": list(job.result_files or []),
        "method": method,
        "metadata": job.user_metadata,
        "estimated_finish": job.estimated_finish,
        "organization_id": job.tenant_id,
        "user_provided_suffix": job.suffix,
        "integrations": [],
    }


def event_public(ev: JobEvent) -> dict:
    return {"id": ev.id, "object": "fine_tuning.job.event", "created_at": ev.created_at, "level": ev.level,
            "message": ev.message, "type": ev.type, "data": ev.data or {}}


def checkpoint_public(ck: JobCheckpoint) -> dict:
    return {"id": ck.id, "object": "fine_tuning.job.checkpoint", "created_at": ck.created_at,
            "fine_tuned_model_checkpoint": ck.fine_tuned_model_checkpoint, "fine_tuning_job_id": ck.job_id,
            "step_number": ck.step_number,
            # OpenAI's metrics are numbers, none required: a value not measured yet (valid_loss
            # before the first evaluation) leaves its key out rather than being null
            "metrics": {k: v for k, v in (ck.metrics or {}).items() if v is not None}}


def page(rows: list, limit: int, view) -> dict:
    return {"object": "list", "data": [view(r) for r in rows[:limit]], "has_more": len(rows) > limit,
            "first_id": rows[0].id if rows else None, "last_id": rows[min(limit, len(rows)) - 1].id if rows else None}


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise SpecError(f"limit must be between 1 and {MAX_PAGE}, got {limit}", "limit")


# ----------------------------------------------------------------------------- ids


def fine_tuned_model_id(base_id: str, tenant_id: str, suffix: str | None, job_id: str) -> str:
    """`ft:{base}:{tenant_id}:{suffix}:{job_id}` (empty suffix segment when none, as OpenAI does)."""
    return f"ft:{base_id}:{tenant_id}:{suffix or ''}:{job_id}"


def new_base_id(suffix: str | None, job_id: str) -> str:
    """A slug for a base trained by a job: `{suffix|base}-{job hex}`."""
    head = (suffix or "base").strip("-")[:39] or "base"
    return f"{head}-{job_id.split('-', 1)[-1]}"


# ----------------------------------------------------------------------------- create


def visible_model(session: Session, tenant_id: str, model_id: str) -> ModelRecord | None:
    return session.scalar(select(ModelRecord).where(
        ModelRecord.id == model_id, or_(ModelRecord.tenant_id.is_(None), ModelRecord.tenant_id == tenant_id)))


def _check_file(session: Session, tenant_id: str, file_id: str, param: str, kind: str) -> File:
    f = session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
    if f is None:
        raise SpecError(f"No such file: '{file_id}'", param, status_code=404, code="not_found")
    want = PURPOSE[kind]
    if f.purpose != want:
        raise SpecError(f"File {file_id} has purpose '{f.purpose}'; a {kind} job needs purpose '{want}'",
                        param, code="invalid_file_purpose")
    if f.status == "error":
        detail = (f.status_details or "").strip()[:500]
        raise SpecError(f"File {file_id} failed validation" + (f": {detail}" if detail else ""), param,
                        code=f"invalid_{param}")
    return f


def _check_base_preset(spec: dict) -> None:
    archs = sorted({a for a, _ in PRESETS})
    arch, size = spec.get("architecture"), spec.get("size")
    if arch is not None and arch not in archs:
        raise SpecError(f"Unknown architecture '{arch}'; one of {archs}", "method.base.architecture")
    if size is not None:
        sizes = sorted({s for a, s in PRESETS if arch is None or a == arch})
        if size not in sizes:
            raise SpecError(f"Unknown size '{size}'; one of {sizes}", "method.base.size")


def create_job(session: Session, tenant: Tenant, body, settings: Settings) -> Job:
    """Validate a `POST /v1/fine_tuning/jobs` body and add the job (not committed).

    The job starts `queued` when its files are processed, with its outbox entry (the caller
    commits, then may relay it), else `validating_files` (a poller promotes it). Raises
    `SpecError` (400/404 naming the parameter)."""

    req = body if isinstance(body, JobCreate) else parse_job_create(body)
    method = normalize_method(req)
    check_limits(method, settings)
    kind = method["type"]
    spec = method[kind]

    base = None
    if kind == "base" and req.model == SCRATCH:
        _check_base_preset(spec)
    else:
        base = visible_model(session, tenant.id, req.model)
        if base is None:
            raise SpecError(f"The model '{req.model}' does not exist", "model", status_code=404,
                            code="model_not_found")
        if base.kind != "base":
            hint = ("; to continue an adapter, set method.prefix.init 'adapter' and init_adapter"
                    if kind == "prefix" else "")
            raise SpecError(f"The model '{req.model}' is not a base model{hint}", "model")
        if kind == "base" and (spec.get("architecture") or spec.get("size")):
            which = "architecture" if spec.get("architecture") else "size"
            raise SpecError(f"{which} is only used with model '{SCRATCH}' (a new base); "
                            f"continuing '{req.model}' keeps its architecture", f"method.base.{which}")

    files = [_check_file(session, tenant.id, req.training_file, "training_file", kind)]
    if req.validation_file is not None:
        files.append(_check_file(session, tenant.id, req.validation_file, "validation_file", kind))

    if kind == "prefix" and spec.get("init_adapter"):
        ad = session.scalar(select(ModelRecord).where(
            ModelRecord.id == spec["init_adapter"], ModelRecord.tenant_id == tenant.id,
            ModelRecord.kind == "adapter"))
        if ad is None or ad.base_id != req.model:
            raise SpecError(f"No adapter '{spec['init_adapter']}' of base '{req.model}' among your models",
                            "method.prefix.init_adapter", status_code=404, code="model_not_found")

    if kind == "prefix":  # the job will make an adapter: 429 over the tenant's adapters quota

        check_adapter_count(session, tenant, settings)

    ready = all(f.status == "processed" for f in files)
    job = Job(
        id=new_id("ftjob"), tenant_id=tenant.id, kind=kind, model=req.model, method=method,
        hyperparameters=dict(spec["hyperparameters"]), training_file=req.training_file,
        validation_file=req.validation_file, suffix=req.suffix,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31 - 1),
        user_metadata=req.metadata, status=state.QUEUED if ready else state.VALIDATING,
        result_files=[], cancel_requested=False, attempts=0,
    )
    session.add(job)
    session.flush()
    if ready:
        outbox.write(session, job.id, tenant.id)
    state.add_event(session, job, "Validating training file" if not ready else "Job queued")
    return job


def promote_validating(session: Session, tenant_id: str | None = None, job_id: str | None = None) -> list[str]:
    """Jobs waiting in validating_files whose files are done: queue them, or fail them with
    `invalid_training_file` when a file ended in `error`. Returns the ids queued (with their outbox
    entries; the caller commits, then may relay them)."""
    q = select(Job).where(Job.status == state.VALIDATING)
    if tenant_id is not None:
        q = q.where(Job.tenant_id == tenant_id)
    if job_id is not None:
        q = q.where(Job.id == job_id)
    out = []
    for job in session.scalars(q.limit(500)).all():
        names = [("training_file", job.training_file)]
        if job.validation_file:
            names.append(("validation_file", job.validation_file))
        files = {p: session.scalar(select(File).where(File.id == fid, File.tenant_id == job.tenant_id))
                 for p, fid in names}
        bad = next(((p, f) for p, f in files.items() if f is None or f.status == "error"), None)
        if bad is not None:
            p, f = bad
            if f is None:  # deleted while we waited
                f = File(id=dict(names)[p], status="error", status_details="the file was deleted")
            state.fail_validation(session, job.id, p, f)
        elif all(f.status == "processed" for f in files.values()):
            if state.mark_queued(session, job.id):
                out.append(job.id)
    return out


# ----------------------------------------------------------------------------- read


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise SpecError(f"No such fine-tuning job: '{job_id}'", "fine_tuning_job_id", status_code=404,
                        code="not_found")
    return job


def _cursor_row(session: Session, model, tenant_id: str, after: str, extra=()):
    row = session.scalar(select(model).where(model.id == after, model.tenant_id == tenant_id, *extra))
    if row is None:
        raise SpecError(f"Unknown cursor: '{after}'", "after")
    return row


def list_jobs(session: Session, tenant_id: str, after: str | None, limit: int,
              metadata: dict[str, str] | None = None) -> dict:
    """Newest first, as OpenAI lists them; `after` is the last id of the previous page; `metadata`
    keeps the jobs whose metadata has every one of these key/value pairs."""
    check_limit(limit)
    q = select(Job).where(Job.tenant_id == tenant_id)
    # in SQL, not after the page is cut: a filter applied to a fetched page would break `has_more`
    for key, value in (metadata or {}).items():
        q = q.where(Job.user_metadata[key].as_string() == value)
    if after:
        cur = _cursor_row(session, Job, tenant_id, after)
        q = q.where(or_(Job.created_at < cur.created_at, (Job.created_at == cur.created_at) & (Job.id < cur.id)))
    rows = session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return page(list(rows), limit, job_public)


def list_events(session: Session, tenant_id: str, job_id: str, after: str | None, limit: int) -> dict:
    """Newest first (OpenAI's order); `after` is the last event id of the previous page."""
    check_limit(limit)
    get_job(session, tenant_id, job_id)
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.tenant_id == tenant_id)
    if after:
        cur = _cursor_row(session, JobEvent, tenant_id, after, (JobEvent.job_id == job_id,))
        q = q.where(JobEvent.seq < cur.seq)
    rows = session.scalars(q.order_by(JobEvent.seq.desc()).limit(limit + 1)).all()
    return page(list(rows), limit, event_public)


def list_checkpoints(session: Session, tenant_id: str, job_id: str, after: str | None, limit: int) -> dict:
    check_limit(limit)
    get_job(session, tenant_id, job_id)
    q = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.tenant_id == tenant_id)
    if after:
        cur = _cursor_row(session, JobCheckpoint, tenant_id, after, (JobCheckpoint.job_id == job_id,))
        q = q.where(JobCheckpoint.seq < cur.seq)
    rows = session.scalars(q.order_by(JobCheckpoint.seq.desc()).limit(limit + 1)).all()
    return page(list(rows), limit, checkpoint_public)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id, job_id)
    if job.status in (state.SUCCEEDED, state.FAILED):
        raise SpecError(f"Job {job_id} has already {job.status}; it cannot be cancelled",
                        "fine_tuning_job_id", code="job_not_cancellable")
    return state.request_cancel(session, job)
