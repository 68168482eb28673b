"""The job outbox (app/jobs/outbox.py), called directly: a queued job is committed with the debt of
its broker message, and a relay pays it as soon as the broker answers; a message the broker lost
is sent again while the job stays queued. The `env` fixture of tests/test_jobs_domain.py (SQLite
through the real migrations, or PostgreSQL), with an enqueue that can be made to fail."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select, text

from app.jobs import outbox, runner, service, state
from app.jobs.monitor import check_once
from app.store.tables import Job, JobOutbox, Tenant


class Broker:
    """An enqueue that raises while `down`, else records the ids."""

    def __init__(self):
        self.down = False
        self.sent: list[str] = []
        self.attempts = 0

    def __call__(self, job_id: str, countdown=None) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
        self.sent.append(job_id)


@pytest.fixture()
def broker(env):  # noqa: F811
    b = Broker()
    env.ctx.enqueue = b
    return b


def _entry(env, job_id) -> JobOutbox | None:
    with env.sf() as s:
        return s.get(JobOutbox, job_id)


def _create(env, broker_is_down: bool = False):
    """What the API does: create and commit, then the fast relay (best effort)."""
    with env.sf() as s:
        job = service.create_job(s, s.get(Tenant, "tenant-a"), {"model": "tiny", "training_file": env.add_file()},
                                 env.settings)
        assert _entry(env, job.id) is None  # nothing is visible before the commit, the job included
        s.commit()
    assert job.status == "queued"
    assert outbox.relay_soon(env.ctx, [job.id]) == ([] if broker_is_down else [job.id])
    return job


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_job_created_while_the_broker_is_down_is_sent_as_soon_as_it_answers(env, broker):  # noqa: F811
    broker.down = True
    job = _create(env, broker_is_down=True)
    e = _entry(env, job.id)
    assert (e.sent_at, e.sends) == (None, 0) and e.not_before <= time.time()  # the failed send is undone
    assert check_once(env.ctx) == [] and broker.attempts == 2  # still down: the monitor tried, in vain
    # while this process's last send failed, relay_soon leaves it to the monitor (no hanging requests)
    assert outbox.relay_soon(env.ctx, [job.id]) == [] and broker.attempts == 2
    broker.down = False
    assert check_once(env.ctx) == [job.id] and broker.sent == [job.id]
    e = _entry(env, job.id)
    assert e.sends == 1 and e.sent_at is not None
    assert e.not_before == pytest.approx(e.sent_at + env.settings.job_resend_after_s)
    assert check_once(env.ctx) == [] and broker.sent == [job.id]  # sent once, not every pass
    with env.sf() as s:  # the claim pays the debt in its transaction
        assert state.claim_job(s, job.id, "w1", 60)
    assert _entry(env, job.id) is None
    assert check_once(env.ctx) == [] and broker.sent == [job.id]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_message_the_broker_lost_is_sent_again_with_a_doubling_wait(env, broker):  # noqa: F811
    job = _create(env)  # sent, then the broker restarted empty: nobody will claim it
    base = env.settings.job_resend_after_s
    t = _entry(env, job.id).sent_at
    waits = []
    for _ in range(6):
        assert outbox.relay(env.ctx, now=t + 0.9 * base) == []  # no duplicate before the wait
        e = _entry(env, job.id)
        assert outbox.relay(env.ctx, now=e.not_before) == [job.id]
        waits.append(round((e.not_before - t) / base, 6))
        t = e.not_before
    assert waits == [1, 2, 4, 8, 10, 10]  # doubling, up to 10 times JOB_RESEND_AFTER_S
    assert len(broker.sent) == 7
    with env.sf() as s:  # one of the copies is claimed: the others find nothing to run
        assert state.claim_job(s, job.id, "w1", 60) and not state.claim_job(s, job.id, "w2", 60)


def test_two_relays_do_not_both_send_an_entry(env, broker):  # noqa: F811
    with env.sf() as s:
        job = service.create_job(s, s.get(Tenant, "tenant-a"), {"model": "tiny", "training_file": env.add_file()},
                                 env.settings)
        s.commit()
    inner: list[list[str]] = []

    def send_while_another_relay_runs(job_id, countdown=None):
        if not inner:  # the entry is marked (and committed) before the send: the second relay skips it
            inner.append(outbox.relay(env.ctx))
        broker(job_id)

    env.ctx.enqueue = send_while_another_relay_runs
    assert outbox.relay(env.ctx) == [job.id]
    assert inner == [[]] and broker.sent == [job.id]


def test_every_transition_into_queued_writes_the_entry_and_leaving_it_removes_it(env, broker):  # noqa: F811
    # validating_files -> queued (the monitor promotes it, and its relay sends it in the same pass)
    pending = env.add_file(status="uploaded")
    job = env.create({"model": "tiny", "training_file": pending})
    assert job.status == "validating_files" and _entry(env, job.id) is None
    with env.sf() as s:
        s.execute(text("UPDATE files SET status = 'processed' WHERE id = :f"), {"f": pending})
        s.commit()
    assert check_once(env.ctx) == [job.id] and _entry(env, job.id).sends == 1
    # running -> queued (its worker died): a fresh entry, sent at the next pass
    with env.sf() as s:
        assert state.claim_job(s, job.id, "dead", 60)
        s.get(Job, job.id).heartbeat_at = time.time() - 5
        s.commit()
    assert _entry(env, job.id) is None
    assert check_once(env.ctx) == [job.id] and broker.sent == [job.id, job.id]
    # queued -> cancelled: nothing is owed any more
    with env.sf() as s:
        service.cancel_job(s, "tenant-a", job.id)
        s.commit()
    assert _entry(env, job.id) is None


def test_the_monitor_drops_entries_of_jobs_not_queued_and_adopts_queued_jobs_without_one(env, broker):  # noqa: F811
    stale = env.create({"model": "tiny", "training_file": env.add_file()})
    bare = env.create({"model": "tiny", "training_file": env.add_file()})
    later = env.create({"model": "tiny", "training_file": env.add_file()})
    t = time.time()
    with env.sf() as s:
        s.get(Job, stale.id).status = "failed"  # e.g. a write that bypassed the state machine
        s.execute(text("DELETE FROM job_outbox WHERE job_id IN (:a, :b)"), {"a": bare.id, "b": later.id})
        # queued by code that sent its own message, delayed by 30 s (heartbeat_at: when it is due)
        s.get(Job, later.id).heartbeat_at = t + 30
        s.commit()
    assert check_once(env.ctx) == [] and broker.sent == []
    assert _entry(env, stale.id) is None
    base = env.settings.job_resend_after_s
    assert _entry(env, bare.id).not_before == pytest.approx(t + base, abs=5)  # as if just sent
    assert _entry(env, later.id).not_before == pytest.approx(t + 30 + base, abs=5)
    assert outbox.relay(env.ctx, now=t + base + 6) == [bare.id]


def test_a_deferred_job_is_sent_again_after_the_delay(env, broker):  # noqa: F811
    env.settings.max_running_jobs_per_tenant = 1
    a = env.create({"model": "tiny", "training_file": env.add_file()})
    b = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        assert state.claim_job(s, a.id, "w1", 60)
    assert outbox.relay(env.ctx) == [b.id]  # delivered: the worker finds the tenant at its quota
    assert runner.run_job(b.id, env.ctx) == "deferred"
    e = _entry(env, b.id)
    assert (e.sends, e.sent_at) == (0, None) and e.not_before > time.time()
    broker.down = True  # the broker is down when it is due: nothing is lost
    assert outbox.relay(env.ctx, now=e.not_before) == []
    broker.down = False
    assert outbox.relay(env.ctx, now=e.not_before + 1) == [b.id] and broker.sent == [b.id, b.id]


def test_the_migration_owes_a_message_to_the_jobs_already_queued(tmp_path):
    from alembic import command

    from app.store.db import alembic_config, make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
        conn.execute(text("INSERT INTO tenants (id, name, created_at, suspended, quotas) "
                          "VALUES ('t', 't', 0, 0, '{}')"))
        for jid, status in (("ftjob-q", "queued"), ("ftjob-r", "running")):
            conn.execute(text(
                "INSERT INTO jobs (id, tenant_id, kind, model, status, method, hyperparameters, training_file, "
                "seed, result_files, created_at, cancel_requested, attempts) VALUES "
                "(:id, 't', 'prefix', 'tiny', :st, '{}', '{}', 'f', 0, '[]', 0, 0, 0)"), {"id": jid, "st": status})
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
        rows = conn.execute(select(JobOutbox.job_id, JobOutbox.sends, JobOutbox.sent_at)).all()
    assert [tuple(r) for r in rows] == [("ftjob-q", 0, None)]
    engine.dispose()
