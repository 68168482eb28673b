"""The periodic check that keeps jobs moving when no request touches them.

Runs in every worker (a thread started on `worker_ready`, in the parent process, which never
touches CUDA) and in every API process (a task in the jobs router's lifespan). Every step is a
compare-and-set, so any number of them can run at once.

1. validating_files jobs whose files finished validation: queued (and enqueued), or failed with
   `invalid_training_file`.
2. running jobs whose heartbeat is older than `job_stale_after_s` (their worker died): back to
   queued and enqueued; the next worker resumes from the last checkpoint.
3. queued jobs that were sent long ago (`REKICK_AFTER_S`) and never picked up, e.g. a message
   lost with a broker that was wiped: sent again (duplicates are harmless: the claim is a CAS).
4. (first) files left `uploaded` by a replica that died before validating them, and (last, every
   `sweep_interval_s`) orphan blobs: see `app.jobs.recovery`.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import or_, select, update

from app.jobs import recovery, state
from app.jobs.context import JobContext
from app.jobs.service import promote_validating
from app.store.models import Job

log = logging.getLogger("prefixd.jobs.monitor")


def rekick_after_s(settings) -> float:
    return max(10 * settings.job_stale_after_s, 300.0)


def check_once(ctx: JobContext) -> list[str]:
    """One pass; returns the job ids it (re-)enqueued."""
    settings = ctx.settings
    _guarded("file recovery", recovery.recover_uploaded_files, ctx)
    with ctx.session_factory() as s:
        ids = promote_validating(s)
        ids += state.requeue_stale_jobs(s, settings.job_stale_after_s)
        s.commit()
        cutoff = time.time() - rekick_after_s(settings)
        old = s.scalars(select(Job.id).where(
            Job.status == state.QUEUED, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))).all()
        for job_id in old:
            res = s.execute(update(Job).where(
                Job.id == job_id, Job.status == state.QUEUED,
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)).values(heartbeat_at=time.time())
                .execution_options(synchronize_session=False))
            if res.rowcount == 1 and job_id not in ids:
                ids.append(job_id)
        s.commit()
    for job_id in ids:
        send(ctx, job_id)
    _guarded("orphan blob sweep", recovery.maybe_sweep_orphans, ctx)
    return ids


def _guarded(what: str, step, ctx) -> None:
    """A recovery step that fails is logged and retried next pass; the job steps still run."""
    try:
        step(ctx)
    except Exception:
        log.warning("%s failed; retried at the next pass", what, exc_info=True)


def send(ctx: JobContext, job_id: str, countdown: float | None = None) -> bool:
    """Enqueue, marking the time on the job (a queued job's heartbeat_at = when it was last sent)."""
    try:
        with ctx.session_factory() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status == state.QUEUED)
                      .values(heartbeat_at=time.time()).execution_options(synchronize_session=False))
            s.commit()
        ctx.send(job_id, countdown)
        return True
    except Exception:
        log.warning("could not enqueue job %s; the monitor retries later", job_id, exc_info=True)
        return False


class Monitor:
    """`check_once` every `interval_s` on a daemon thread."""

    def __init__(self, ctx: JobContext, interval_s: float | None = None):
        self.ctx = ctx
        self.interval_s = interval_s or ctx.settings.job_monitor_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Monitor":
        self._thread = threading.Thread(target=self._loop, name="job-monitor", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                check_once(self.ctx)
            except Exception:
                log.warning("job monitor pass failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
