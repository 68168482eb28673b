"""Getting eval runs to the workers, and back to them when a message or a worker is lost.

The run row is the truth and the broker message (`worker.tasks.run_eval(run_id)`) only a hint,
as for fine-tuning jobs (`app.jobs.outbox`): a queued run is owed a message until a worker claims
it. `sent_at` / `sends` on the run play the outbox entry's part:

- `relay(ctx, run_ids=None)` sends the queued runs that are due: never sent (created while the
  broker was down), or sent `resend_after_s` ago (doubling with each send) and still unclaimed
  (a message the broker lost). A compare-and-set on `sends` marks a run sent before it is sent,
  so two relays never both send it; a failed send is undone and retried at the next pass.
- `requeue_stale(session, settings)`: an `in_progress` run whose worker stopped beating for
  `job_stale_after_s` goes back to `queued` (the next worker skips the items already written),
  or ends `failed` (`worker_lost`) after MAX_ATTEMPTS lost workers.
- `check_once(ctx)` does both: one step of the job monitor, which runs in every API process and
  every worker.

The send function is the composition root's (`ctx.extra["send_eval_run"]`: the API's jobs
lifespan and the worker's Celery app set it); a context without one only requeues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.store.eval_tables import EvalRunRecord
from app.store.tables import now

log = logging.getLogger("prefixd.evals.dispatch")

MAX_ATTEMPTS = 3
RELAY_BATCH = 200
RESEND_MAX_FACTOR = 10


def resend_after_s(settings, sends: int) -> float:
    base = settings.job_resend_after_s
    return min(base * 2 ** max(0, sends - 1), base * RESEND_MAX_FACTOR)


def relay(ctx, run_ids: Iterable[str] | None = None, now_s: float | None = None) -> list[str]:
    """Send the due queued runs (of `run_ids`, or all); returns the ids sent. A broker error is
    logged, not raised: that run and the rest stay due."""
    send = ctx.extra.get("send_eval_run")
    if send is None:
        return []
    t = time.time() if now_s is None else now_s
    with ctx.session_factory() as s:
        q = select(EvalRunRecord.id, EvalRunRecord.sends, EvalRunRecord.sent_at).where(
            EvalRunRecord.status == "queued")
        if run_ids is not None:
            q = q.where(EvalRunRecord.id.in_(list(run_ids)))
        rows = s.execute(q.order_by(EvalRunRecord.created_at).limit(RELAY_BATCH)).all()
        marked = []
        for r in rows:
            if r.sent_at is not None and r.sent_at + resend_after_s(ctx.settings, r.sends) > t:
                continue
            res = s.execute(update(EvalRunRecord).where(
                EvalRunRecord.id == r.id, EvalRunRecord.status == "queued", EvalRunRecord.sends == r.sends)
                .values(sent_at=t, sends=r.sends + 1).execution_options(synchronize_session=False))
            if res.rowcount == 1:
                marked.append(r)
        s.commit()
    sent = []
    for i, r in enumerate(marked):
        try:
            send(r.id)
        except Exception as e:  # noqa: BLE001 - any broker or transport failure
            log.warning("could not send eval run %s to the broker (%s: %s); %d wait for the next pass",
                        r.id, type(e).__name__, e, len(marked) - i)
            _unmark(ctx, marked[i:], t)
            break
        sent.append(r.id)
    return sent


def _unmark(ctx, rows, t: float) -> None:
    try:
        with ctx.session_factory() as s:
            for r in rows:
                s.execute(update(EvalRunRecord).where(
                    EvalRunRecord.id == r.id, EvalRunRecord.sends == r.sends + 1, EvalRunRecord.sent_at == t)
                    .values(sent_at=r.sent_at, sends=r.sends).execution_options(synchronize_session=False))
            s.commit()
    except Exception:  # the marks stand: those runs are sent again after resend_after_s
        log.warning("could not unmark %d eval runs", len(rows), exc_info=True)


def relay_soon(ctx, run_ids: Iterable[str]) -> list[str]:
    """`relay` these just-committed runs now, best effort: never raises (the monitor retries)."""
    try:
        return relay(ctx, list(run_ids))
    except Exception:
        log.warning("could not relay eval runs; the monitor sends them", exc_info=True)
        return []


def requeue_stale(session: Session, settings) -> list[str]:
    """In-progress runs whose worker is gone: queued again (owed a message at once), or failed
    after MAX_ATTEMPTS. The caller commits."""
    cutoff = time.time() - settings.job_stale_after_s
    stale = or_(EvalRunRecord.heartbeat_at.is_(None), EvalRunRecord.heartbeat_at < cutoff)
    requeued = []
    for run_id, attempts in session.execute(select(EvalRunRecord.id, EvalRunRecord.attempts).where(
            EvalRunRecord.status == "in_progress", stale)).all():
        mine = and_(EvalRunRecord.id == run_id, EvalRunRecord.status == "in_progress", stale)
        if attempts >= MAX_ATTEMPTS:
            session.execute(update(EvalRunRecord).where(mine).values(
                status="failed", finished_at=now(),
                error={"code": "worker_lost", "message": f"The run's worker was lost {attempts} times"})
                .execution_options(synchronize_session=False))
            continue
        res = session.execute(update(EvalRunRecord).where(mine).values(
            status="queued", worker_id=None, sent_at=None, sends=0).execution_options(synchronize_session=False))
        if res.rowcount == 1:
            log.warning("eval run %s: its worker stopped beating; queued again", run_id)
            requeued.append(run_id)
    return requeued


def check_once(ctx) -> list[str]:
    with ctx.session_factory() as s:
        requeue_stale(s, ctx.settings)
        s.commit()
    return relay(ctx)
