"""The job state machine, kept in the database (the authoritative copy; Celery only carries ids).

    validating_files -> queued -> running -> succeeded | failed | cancelled
    validating_files | queued -> cancelled          (cancel before a worker took it)
    validating_files -> failed                      (a file ended in `error`)
    running -> queued                               (its worker died: heartbeat stale; resumes)

Every transition is a compare-and-set `UPDATE ... WHERE id = ? AND status = ?`, so two workers
(a redelivered message, two API replicas' pollers) can race and only one wins. A transition into
queued writes the job's outbox entry (`app.jobs.outbox`) in its transaction, and the claim
deletes it in its own: a queued job is owed a broker message until a worker takes it. A worker proves
it still holds a running job through `worker_id`: heartbeats and the final write match on it, so
a worker that lost its job (requeued after a long stall) cannot overwrite the new holder's work.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.jobs import outbox
from app.store.tables import File, Job, JobCheckpoint, JobEvent, Tenant, now

log = logging.getLogger("prefixd.jobs")

VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATUSES = ACTIVE + TERMINAL

# A job whose workers were lost this many times in a row, with no new checkpoint in between, is
# failed instead of being handed to another worker: it is the likely cause (OOM at its first step).
MAX_ATTEMPTS = 3


def add_event(session: Session, job: Job | str, message: str, *, level: str = "info",
              type: str = "message", data: dict | None = None, tenant_id: str | None = None) -> JobEvent:
    if isinstance(job, Job):
        job_id, tenant_id = job.id, job.tenant_id
    else:
        job_id = job
        if tenant_id is None:
            tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    ev = JobEvent(job_id=job_id, tenant_id=tenant_id, level=level, message=message, type=type, data=data)
    session.add(ev)
    return ev


# ----------------------------------------------------------------------------- transitions


def _cas(session: Session, job_id: str, from_status: str | tuple[str, ...], **values) -> bool:
    statuses = (from_status,) if isinstance(from_status, str) else from_status
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(statuses)).values(**values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def mark_queued(session: Session, job_id: str) -> bool:
    """validating_files -> queued, with its outbox entry. The caller commits, then may relay."""
    ok = _cas(session, job_id, VALIDATING, status=QUEUED)
    if ok:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
        outbox.write(session, job_id, tenant_id)
        add_event(session, job_id, "Files validated; job queued", tenant_id=tenant_id)
    return ok


def fail_validation(session: Session, job_id: str, param: str, file: File) -> bool:
    detail = (file.status_details or "").strip()
    msg = f"The {param.replace('_', ' ')} {file.id} failed validation" + (f": {detail[:500]}" if detail else "")
    code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
    ok = _cas(session, job_id, VALIDATING, status=FAILED, finished_at=now(),
              error={"code": code, "message": msg, "param": param})
    if ok:
        add_event(session, job_id, msg, level="error")
    return ok


def claim_job(session: Session, job_id: str, worker_id: str, stale_after_s: float) -> bool:
    """queued -> running, atomically; also takes over a running job whose heartbeat is stale (its
    worker died and the broker redelivered the message). Returns False if another worker holds
    the job or it is not runnable: a second delivery of the same message does nothing."""
    t = time.time()
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            or_(Job.status == QUEUED,
                and_(Job.status == RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < t - stale_after_s))),
        )
        .values(status=RUNNING, worker_id=worker_id, heartbeat_at=t, started_at=now(), attempts=Job.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        outbox.remove(session, job_id)  # delivered: later copies of the message find nothing to claim
    session.commit()
    return res.rowcount == 1


def heartbeat(session: Session, job_id: str, worker_id: str, **values) -> bool:
    """Refresh the heartbeat (plus progress columns). False: this worker no longer holds the job."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.worker_id == worker_id)
        .values(heartbeat_at=time.time(), **values).execution_options(synchronize_session=False)
    )
    session.commit()
    return res.rowcount == 1


def finish(session: Session, job_id: str, worker_id: str, status: str, error: dict | None = None,
           **values) -> bool:
    """running -> succeeded|failed|cancelled by the worker that holds the job. Not committed."""
    assert status in TERMINAL
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.worker_id == worker_id)
        .values(status=status, error=error, finished_at=now(), estimated_finish=None, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def stop_reason(session: Session, job_id: str, worker_id: str) -> str | None:
    """Why a running job should stop now: 'cancelled', 'suspended', 'lost' (another worker or
    state took it), or None to keep going."""
    row = session.execute(
        select(Job.status, Job.worker_id, Job.cancel_requested, Tenant.suspended)
        .join(Tenant, Tenant.id == Job.tenant_id).where(Job.id == job_id)
    ).first()
    if row is None or row.status != RUNNING or row.worker_id != worker_id:
        return "lost"
    if row.cancel_requested:
        return "cancelled"
    if row.suspended:
        return "suspended"
    return None


def request_cancel(session: Session, job: Job) -> Job:
    """Cooperative cancel. Not yet running: cancelled at once. Running: flag it; the training loop
    sees the flag within about a second and the worker marks it cancelled. Not committed."""
    if job.status in (VALIDATING, QUEUED):
        if _cas(session, job.id, (VALIDATING, QUEUED), status=CANCELLED, cancel_requested=True,
                finished_at=now(), estimated_finish=None):
            outbox.remove(session, job.id)
            add_event(session, job, "Job cancelled")
    elif job.status == RUNNING and not job.cancel_requested:
        session.execute(update(Job).where(Job.id == job.id, Job.status == RUNNING)
                        .values(cancel_requested=True).execution_options(synchronize_session=False))
        add_event(session, job, "Cancellation requested; the job stops at its next step")
    session.flush()
    session.refresh(job)
    return job


def requeue_stale_jobs(session: Session, stale_after_s: float) -> list[str]:
    """Running jobs whose heartbeat is older than `stale_after_s` (their worker died): put them back
    to queued so the next worker resumes them from their last checkpoint (see `requeue_lost`).
    Returns their ids (their outbox entries are written; the caller commits, then may relay)."""
    cutoff = time.time() - stale_after_s
    stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
    jobs = session.scalars(select(Job).where(Job.status == RUNNING, stale)).all()
    return requeue_lost(session, jobs, stale)


def expire_worker(session: Session, worker_id_prefix: str) -> int:
    """Mark the running jobs of a worker known to be dead (its supervisor saw it exit) as stale at
    once, so that the next monitor pass requeues them (`requeue_stale_jobs`) instead of waiting
    out `job_stale_after_s`. Worker ids are `host:pid:random`, so `host:pid:` names one process.
    Returns how many; the caller commits."""
    res = session.execute(update(Job).where(Job.status == RUNNING,
                                            Job.worker_id.startswith(worker_id_prefix, autoescape=True))
                          .values(heartbeat_at=0.0).execution_options(synchronize_session=False))
    return res.rowcount


def requeue_lost(session: Session, jobs: list[Job], still_lost) -> list[str]:
    """Jobs whose worker is gone: back to queued, to resume from their last checkpoint; cancelled if
    they were being cancelled; failed once MAX_ATTEMPTS workers in a row were lost with no new
    checkpoint between them. Only such losses count: a job that keeps checkpointing is not at
    fault for restarts of the infrastructure (deploys, OOM kills elsewhere, a supervisor restart).
    `still_lost` is the condition that found them, re-checked in each compare-and-set."""
    to_enqueue = []
    for job in jobs:
        step, strikes = _resume_point(session, job)
        if job.cancel_requested:
            values = dict(status=CANCELLED, finished_at=now(), estimated_finish=None, worker_id=None)
            msg, level = "Worker lost while cancelling; job cancelled", "warning"
        elif strikes >= MAX_ATTEMPTS:
            values = dict(status=FAILED, finished_at=now(), estimated_finish=None, worker_id=None,
                          error={"code": "worker_lost", "param": None,
                                 "message": f"The job's worker stopped responding {strikes} times in a row "
                                            "without reaching a new checkpoint"})
            msg, level = f"Worker lost {strikes} times without progress; job failed", "error"
        else:
            values = dict(status=QUEUED, worker_id=None)
            where = f"step {step}" if step else "the start (no checkpoint yet)"
            msg, level = f"Worker lost; job requeued, resuming from {where}", "warning"
        res = session.execute(update(Job).where(Job.id == job.id, Job.status == RUNNING,
                                                Job.worker_id == job.worker_id, still_lost).values(**values)
                              .execution_options(synchronize_session=False))
        if res.rowcount == 1:
            add_event(session, job, msg, level=level, data={"worker_lost": True, "resume_step": step})
            log.warning("job %s: %s", job.id, msg)
            if values["status"] == QUEUED:
                outbox.write(session, job.id, job.tenant_id)
                to_enqueue.append(job.id)
    return to_enqueue


def _resume_point(session: Session, job: Job) -> tuple[int, int]:
    """(newest checkpoint step or 0, losses in a row without progress, this one included). Each loss
    event records the step it resumes from: the first loss that names step N > 0 followed the
    attempt that reached N, and every further one, like any loss before a first checkpoint, got
    no further."""
    step = session.scalar(select(func.max(JobCheckpoint.step_number)).where(JobCheckpoint.job_id == job.id)) or 0
    events = session.scalars(select(JobEvent.data).where(
        JobEvent.job_id == job.id, JobEvent.level.in_(("warning", "error")))).all()
    before = sum(1 for d in events if isinstance(d, dict) and d.get("worker_lost") and d.get("resume_step") == step)
    return step, before + (0 if step > 0 else 1)


def record_checkpoint(session: Session, job: Job, step: int, metrics: dict, blob_key: str | None,
                      model_id: str) -> JobCheckpoint | None:
    """One JobCheckpoint per (job, step); a resumed run re-reaching a step does not duplicate it."""
    exists = session.scalar(select(JobCheckpoint.id).where(JobCheckpoint.job_id == job.id,
                                                           JobCheckpoint.step_number == step))
    if exists:
        return None
    ck = JobCheckpoint(job_id=job.id, tenant_id=job.tenant_id, step_number=step,
                       metrics={"step": step, **metrics}, blob_key=blob_key,
                       fine_tuned_model_checkpoint=f"{model_id}:ckpt-step-{step}")
    session.add(ck)
    return ck
