"""The periodic check that keeps jobs moving when no request touches them.

Runs in every worker (a thread started on `worker_ready`, in the parent process, which never
touches CUDA) and in every API process (a task in the jobs router's lifespan). Every step is a
compare-and-set, so any number of them can run at once.

1. validating_files jobs whose files finished validation: queued, or failed with
   `invalid_training_file`.
2. running jobs whose heartbeat is older than `job_stale_after_s` (their worker died): back to
   queued; the next worker resumes from the last checkpoint.
3. the outbox (`app.jobs.outbox`): entries of jobs no longer queued are dropped, then every entry
   due is sent: a job queued while the broker was down as soon as it answers again, a job whose
   message the broker lost (restarted empty) `JOB_RESEND_AFTER_S` after its send, if no worker
   claimed it by then (duplicates are harmless: the claim is a CAS).
4. eval runs (`app.evals.dispatch`): the same two steps, for runs instead of jobs.
5. (first) files left `uploaded` by a replica that died before validating them, and (last, every
   `sweep_interval_s`) orphan blobs: see `app.jobs.recovery`.
"""

from __future__ import annotations

import logging
import threading

from app.evals import dispatch
from app.jobs import outbox, recovery, state
from app.jobs.context import JobContext
from app.jobs.service import promote_validating

log = logging.getLogger("prefixd.jobs.monitor")


def check_once(ctx: JobContext) -> list[str]:
    """One pass; returns the job ids it sent to the broker."""
    settings = ctx.settings
    _guarded("file recovery", recovery.recover_uploaded_files, ctx)
    with ctx.session_factory() as s:
        promote_validating(s)
        state.requeue_stale_jobs(s, settings.job_stale_after_s)
        outbox.tidy(s, settings)
        s.commit()
    sent = outbox.relay(ctx)
    _guarded("eval runs", _eval_runs, ctx)
    _guarded("orphan blob sweep", recovery.maybe_sweep_orphans, ctx)
    return sent


def _eval_runs(ctx) -> None:
    """Eval runs owed a message, or whose worker died (app.evals.dispatch)."""

    dispatch.check_once(ctx)


def _guarded(what: str, step, ctx) -> None:
    """A recovery step that fails is logged and retried next pass; the job steps still run."""
    try:
        step(ctx)
    except Exception:
        log.warning("%s failed; retried at the next pass", what, exc_info=True)


class Monitor:
    """`check_once` every `interval_s` on a daemon thread."""

    def __init__(self, ctx: JobContext, interval_s: float | None = None):
        self.ctx = ctx
        self.interval_s = interval_s or ctx.settings.job_monitor_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Monitor:
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
