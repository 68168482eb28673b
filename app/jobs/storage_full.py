"""A job that found the storage full is not at fault: it waits, then resumes from its checkpoint.

`requeue_or_fail(run, exc)` is what the runner calls when a run stops on `is_storage_full(exc)`
(a checkpoint or adapter upload, the local checkpoint the engine writes, a database write).
The job goes `running -> queued` (the transition a lost worker takes), keeps its checkpoint
blobs, drops its local copies (space given back at once), and is sent again after
`JOB_STORAGE_FULL_RETRY_DELAY_S`, doubled at each retry. Only retries in a row without a new
checkpoint count: after `JOB_STORAGE_FULL_RETRIES` of them the job fails with code
`storage_full`, which is retryable by the user: free space, then create the job again.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update

from app.jobs import outbox, state
from app.store.storage import with_reserve
from app.store.tables import Job, JobCheckpoint, JobEvent

log = logging.getLogger("prefixd.jobs")

REQUEUED = "requeued"


def retries_in_a_row(session, job_id: str) -> tuple[int, int]:
    """(newest checkpoint step or 0, storage-full requeues already recorded at that step)."""
    step = session.scalar(select(func.max(JobCheckpoint.step_number)).where(JobCheckpoint.job_id == job_id)) or 0
    events = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id,
                                                         JobEvent.level == "warning")).all()
    done = sum(1 for d in events if isinstance(d, dict) and d.get("storage_full") and d.get("resume_step") == step)
    return step, done


def requeue_or_fail(run, exc: BaseException) -> str:
    """`run` is the runner's JobRun. Returns 'requeued', 'failed' or 'lost'."""
    settings = run.settings
    log.warning("job %s: storage full (%s: %s)", run.job_id, type(exc).__name__, exc)
    with run.session() as s:
        step, done = retries_in_a_row(s, run.job_id)
    limit = int(settings.job_storage_full_retries)
    if done >= limit:
        message = (f"The storage was full {done + 1} times in a row (the job waited and retried {done} times). "
                   "Free space (delete files or models you no longer need), then create the job again")
        return with_reserve(settings, lambda: run.finish(
            state.FAILED, error={"code": "storage_full", "message": message, "param": None}))
    delay = float(settings.job_storage_full_retry_delay_s) * 2 ** done
    where = f"step {step}" if step else "the start (no checkpoint yet)"
    msg = (f"Storage full; job requeued, resuming from {where} in {delay:g} s "
           f"(retry {done + 1} of {limit})")

    def requeue() -> bool:
        with run.session() as s:
            res = s.execute(update(Job).where(Job.id == run.job_id, Job.status == state.RUNNING,
                                              Job.worker_id == run.worker_id)
                            .values(status=state.QUEUED, worker_id=None, estimated_finish=None)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                s.rollback()
                return False
            outbox.write(s, run.job_id, run.tenant_id, delay_s=delay)  # the relay sends it when due
            state.add_event(s, run.job_id, msg, tenant_id=run.tenant_id, level="warning",
                            data={"storage_full": True, "resume_step": step, "retry_in_s": delay})
            s.commit()
            return True

    if not with_reserve(settings, requeue):
        run.lost.set()
        return "lost"
    run.cleanup_checkpoints(remove_blobs=False)  # the next run downloads them from blobs
    log.warning("job %s: %s", run.job_id, msg)
    return REQUEUED
