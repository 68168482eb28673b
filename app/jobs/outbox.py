"""The job outbox: a queued job is owed a broker message until a worker claims it.

The job row is the truth and the message only a hint. Every transition into `queued` writes (or
resets) the job's `job_outbox` entry in the transaction that makes it (`write`): a job created
with its files ready (`service.create_job`), its files' validation done (`state.mark_queued`), a
lost worker's job put back (`state.requeue_lost`), a job deferred at its tenant's running-jobs
quota (`runner.run_job`, due after a delay). So an answer of `queued` means that the job and its
message are committed together, whether the broker is up or not; the claim
(`state.claim_job`) deletes the entry in its own transaction.

A relay (`relay`) sends the entries that are due, as soon as the broker answers:
- the caller of a transition relays its own entries right after its commit (`relay_soon`: best
  effort, it never raises; a process whose last send failed leaves that to the monitor for a
  few seconds, so that a broker that hangs does not hold a thread per request);
- every monitor pass (`app.jobs.monitor`, in every API process and worker) relays every entry due.

A relay marks an entry sent with a compare-and-set before it sends, so two relays never both send
it, and undoes the mark when the send fails: the entry is due again at the next pass. A sent
entry is due again `JOB_RESEND_AFTER_S` after its send, a wait that doubles at each send up to
10 times that: a message the broker lost (Redis restarted empty, a crash between the mark and the
send) costs about a minute, while a job waiting behind a long queue collects a duplicate every 10
minutes, not every pass. Duplicates are harmless: the claim is a compare-and-set.

`tidy` (each monitor pass) drops the entries of jobs that are no longer queued, and gives a
queued job that has none (queued by code that sends its own message) an entry as if it had just
been sent, so that it is sent again if no worker takes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sqlalchemy import delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.tables import Job, JobOutbox
from app.store.tables import now as now_s

log = logging.getLogger("prefixd.jobs.outbox")

# state.QUEUED (app.jobs.state writes entries through this module, so it cannot be imported here)
QUEUED = "queued"
RELAY_BATCH = 200  # entries sent per relay; the rest wait for the next pass
RESEND_MAX_FACTOR = 10  # the re-send wait doubles up to this many times JOB_RESEND_AFTER_S
FAST_RELAY_PAUSE_S = 5.0  # after a failed send, relay_soon leaves sending to the monitor this long


def resend_after_s(settings, sends: int) -> float:
    """How long after its `sends`-th send an entry whose job is still queued is sent again."""
    base = settings.job_resend_after_s
    return min(base * 2 ** max(0, sends - 1), base * RESEND_MAX_FACTOR)


# ----------------------------------------------------------------------------- writes (in a transition)


def _upsert(session: Session, row: dict, update_cols: dict | None) -> None:
    """INSERT `row`; on a conflict on job_id, UPDATE `update_cols`, or do nothing when None."""
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is not None:
        stmt = insert(JobOutbox).values(**row)
        stmt = (stmt.on_conflict_do_nothing(index_elements=["job_id"]) if update_cols is None
                else stmt.on_conflict_do_update(index_elements=["job_id"], set_=update_cols))
        session.execute(stmt)
        return
    # another database: update, else insert (a transition that writes an entry has won a
    # compare-and-set on the job row first, so two of them do not write one entry at once)
    if update_cols and session.execute(update(JobOutbox).where(JobOutbox.job_id == row["job_id"])
                                       .values(**update_cols).execution_options(synchronize_session=False)).rowcount:
        return
    if session.get(JobOutbox, row["job_id"]) is None:
        session.add(JobOutbox(**row))
        session.flush()


def write(session: Session, job_id: str, tenant_id: str, delay_s: float = 0.0, now: float | None = None) -> None:
    """The job is (still) queued: owe it a message, due in `delay_s`. Resets an existing entry
    (never sent, as of now). Part of the caller's transaction; the caller commits, then may
    `relay_soon`."""
    t = time.time() if now is None else now
    fresh = dict(not_before=t + max(0.0, delay_s), sent_at=None, sends=0)
    _upsert(session, dict(job_id=job_id, tenant_id=tenant_id, created_at=now_s(), **fresh), fresh)


def remove(session: Session, job_id: str) -> None:
    """The job left `queued` (claimed, cancelled): nothing is owed. The caller commits."""
    session.execute(delete(JobOutbox).where(JobOutbox.job_id == job_id).execution_options(synchronize_session=False))


def tidy(session: Session, settings, now: float | None = None) -> tuple[int, int]:
    """Drop the entries of jobs no longer queued; give each queued job without an entry one, as
    if just sent (its transition sent its own message): sent again after `resend_after_s`, or
    after the delay it was queued with (a queued job's heartbeat_at in the future) when later.
    Returns (dropped, adopted); the caller commits."""
    t = time.time() if now is None else now
    dropped = session.execute(delete(JobOutbox).where(~exists().where(
        Job.id == JobOutbox.job_id, Job.status == QUEUED)).execution_options(synchronize_session=False)).rowcount
    orphans = session.execute(select(Job.id, Job.tenant_id, Job.heartbeat_at).where(
        Job.status == QUEUED, ~exists().where(JobOutbox.job_id == Job.id)).limit(RELAY_BATCH)).all()
    for job_id, tenant_id, heartbeat_at in orphans:
        due = max(t, heartbeat_at or 0.0) + resend_after_s(settings, 1)
        _upsert(session, dict(job_id=job_id, tenant_id=tenant_id, created_at=now_s(), not_before=due,
                              sent_at=t, sends=1), None)
    return dropped or 0, len(orphans)


# ----------------------------------------------------------------------------- relay (after a commit)


def relay(ctx, job_ids: Iterable[str] | None = None, now: float | None = None) -> list[str]:
    """Send the due entries (of `job_ids`, or all) of queued jobs through `ctx.send`; returns the
    ids sent. A broker error is logged, not raised: that entry and the rest stay due for the next
    pass. Database errors propagate."""
    if ctx.enqueue is None:  # this process has no broker: another one's monitor relays
        return []
    settings = ctx.settings
    t = time.time() if now is None else now
    with ctx.session_factory() as s:
        q = (select(JobOutbox.job_id, JobOutbox.sends, JobOutbox.sent_at)
             .join(Job, Job.id == JobOutbox.job_id)
             .where(JobOutbox.not_before <= t, Job.status == QUEUED))
        if job_ids is not None:
            q = q.where(JobOutbox.job_id.in_(list(job_ids)))
        rows = s.execute(q.order_by(JobOutbox.not_before).limit(RELAY_BATCH)).all()
        marked = []
        for r in rows:
            sends = r.sends + 1
            res = s.execute(update(JobOutbox).where(
                JobOutbox.job_id == r.job_id, JobOutbox.sends == r.sends, JobOutbox.not_before <= t)
                .values(sent_at=t, sends=sends, not_before=t + resend_after_s(settings, sends))
                .execution_options(synchronize_session=False))
            if res.rowcount == 1:
                marked.append(r)
        s.commit()
    sent: list[str] = []
    for i, r in enumerate(marked):
        try:
            ctx.send(r.job_id)
        except Exception as e:  # noqa: BLE001 - any broker or transport failure
            ctx.extra["broker_failed_at"] = time.monotonic()
            log.warning("could not send job %s to the broker (%s: %s); %d message(s) wait for the next "
                        "monitor pass", r.job_id, type(e).__name__, e, len(marked) - i)
            _unmark(ctx, marked[i:], t)
            break
        ctx.extra.pop("broker_failed_at", None)
        sent.append(r.job_id)
        if r.sent_at is not None:
            log.info("job %s re-sent: no worker claimed it %.0f s after its last send (send %d)",
                     r.job_id, t - r.sent_at, r.sends + 1)
    return sent


def _unmark(ctx, rows, t: float) -> None:
    """Undo the marks of entries that were not sent: due again now, as before."""
    try:
        with ctx.session_factory() as s:
            for r in rows:
                s.execute(update(JobOutbox).where(
                    JobOutbox.job_id == r.job_id, JobOutbox.sends == r.sends + 1, JobOutbox.sent_at == t)
                    .values(sent_at=r.sent_at, sends=r.sends, not_before=t)
                    .execution_options(synchronize_session=False))
            s.commit()
    except Exception:  # the marks stand: those entries are sent again after resend_after_s
        log.warning("could not unmark %d outbox entries", len(rows), exc_info=True)


def relay_soon(ctx, job_ids: Iterable[str]) -> list[str]:
    """`relay` these just-committed entries now, best effort: never raises (the monitor relays
    whatever is left), and does nothing for FAST_RELAY_PAUSE_S after this process's last failed
    send."""
    job_ids = list(job_ids)
    failed_at = ctx.extra.get("broker_failed_at")
    if not job_ids or (failed_at is not None and time.monotonic() - failed_at < FAST_RELAY_PAUSE_S):
        return []
    try:
        return relay(ctx, job_ids)
    except Exception:
        log.warning("could not relay job(s) %s; the monitor sends them", ", ".join(job_ids), exc_info=True)
        return []


def pending(session: Session, job_ids: Iterable[str] | None = None) -> list[JobOutbox]:
    """The entries (of `job_ids`, or all), oldest due first: for tests and operators."""
    q = select(JobOutbox)
    if job_ids is not None:
        q = q.where(JobOutbox.job_id.in_(list(job_ids)))
    return list(session.scalars(q.order_by(JobOutbox.not_before)))


__all__ = ["write", "remove", "tidy", "relay", "relay_soon", "pending", "resend_after_s"]
