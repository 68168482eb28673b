"""The jobs domain, called directly: SQLite (through the real Alembic migrations), local blobs, a
tiny base, and an enqueue that records ids instead of sending them to Celery."""

from __future__ import annotations

import csv
import io
import threading
import time

import pytest
import torch
from sqlalchemy import select

from app.config import Settings
from app.jobs import outbox, runner, service, state
from app.jobs.monitor import check_once
from app.jobs.spec import SpecError, check_limits, normalize_method, parse_job_create
from app.store.tables import File, Job, JobCheckpoint, JobEvent, ModelRecord, Tenant
from tests.jobs.conftest import dataset_rows as _dataset

SMALL = {"type": "prefix", "prefix": {"num_virtual_tokens": 4,
                                      "hyperparameters": {"n_epochs": 2, "batch_size": 16}}}


def _events(env, job_id) -> list[JobEvent]:
    with env.sf() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def _job(env, job_id) -> Job:
    with env.sf() as s:
        return s.get(Job, job_id)


# ----------------------------------------------------------------------------- request validation


@pytest.mark.parametrize("patch, param", [
    ({"method": {"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": 101}}}},
     "method.prefix.hyperparameters.n_epochs"),
    ({"method": {"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": 0}}}},
     "method.prefix.hyperparameters.n_epochs"),
    ({"method": {"type": "prefix", "prefix": {"hyperparameters": {"batch_size": "8"}}}},
     "method.prefix.hyperparameters.batch_size"),
    ({"method": {"type": "prefix", "prefix": {"num_virtual_tokens": 513}}}, "method.prefix.num_virtual_tokens"),
    ({"method": {"type": "prefix", "prefix": {"typo": 1}}}, "method.prefix.typo"),
    ({"method": {"type": "prefix", "prefix": {"init_text": "hello"}}}, "method.prefix.init_text"),
    ({"method": {"type": "prefix", "prefix": {"init": "adapter"}}}, "method.prefix.init_adapter"),
    ({"method": {"type": "base", "base": {"hyperparameters": {"learning_rate": -1}}}},
     "method.base.hyperparameters.learning_rate"),
    ({"method": {"type": "lora"}}, "method"),
    ({"suffix": "Bad_Suffix"}, "suffix"),
    ({"suffix": "x" * 41}, "suffix"),
    ({"extra_field": True}, "extra_field"),
    ({"seed": -1}, "seed"),
    ({"metadata": {"k": 1}}, "metadata.k"),
])
def test_request_errors_name_the_parameter(patch, param):
    body = {"model": "tiny", "training_file": "file-1", **patch}
    with pytest.raises(SpecError) as e:
        check_limits(normalize_method(parse_job_create(body)), Settings())
    assert e.value.param == param and e.value.status_code == 400


def test_defaults_and_aliases():
    m = normalize_method(parse_job_create({"model": "tiny", "training_file": "f", "method": {"type": "prefix"}}))
    assert m["type"] == "prefix" and m["prefix"]["hyperparameters"]["n_epochs"] == "auto"
    m = normalize_method(parse_job_create({"model": "tiny", "training_file": "f"}))
    assert m["type"] == "prefix"
    m = normalize_method(parse_job_create({"model": "tiny", "training_file": "f", "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}}))
    assert m == {"type": "prefix", "prefix": {**m["prefix"]}} and m["prefix"]["hyperparameters"]["n_epochs"] == 3


def test_create_checks_references(env):
    fid = env.add_file()
    other = env.add_file(tenant="tenant-b")
    corpus = env.add_file(purpose="base-train")

    def err(body, tenant="tenant-a"):
        with pytest.raises(SpecError) as e:
            env.create({"model": "tiny", "training_file": fid, **body}, tenant)
        return e.value.status_code, e.value.param

    assert err({"model": "nope"}) == (404, "model")
    assert err({"training_file": other}) == (404, "training_file")
    assert err({"training_file": "file-missing"}) == (404, "training_file")
    assert err({"training_file": corpus}) == (400, "training_file")
    assert err({"validation_file": other}) == (404, "validation_file")
    assert err({"method": {"type": "prefix", "prefix": {"init": "adapter", "init_adapter": "ft:x"}}}) == (
        404, "method.prefix.init_adapter")
    assert err({"method": {"type": "base", "base": {"architecture": "llama"}}}) == (400, "method.base.architecture")
    job = env.create({"model": "tiny", "training_file": fid, "suffix": "my-task"})
    assert job.status == "queued" and job.kind == "prefix" and job.seed is not None
    view = service.job_public(job)
    assert view["object"] == "fine_tuning.job" and view["error"] is None and view["result_files"] == []


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_waits_for_file_validation(env):
    pending = env.add_file(status="uploaded")
    job = env.create({"model": "tiny", "training_file": pending})
    assert job.status == "validating_files"
    assert check_once(env.ctx) == [] and _job(env, job.id).status == "validating_files"
    with env.sf() as s:
        s.get(File, pending).status = "processed"
        s.commit()
    assert check_once(env.ctx) == [job.id] and _job(env, job.id).status == "queued"

    bad = env.add_file(status="uploaded")
    job2 = env.create({"model": "tiny", "training_file": bad})
    with env.sf() as s:
        f = s.get(File, bad)
        f.status, f.status_details = "error", "line 3: not JSON"
        s.commit()
    check_once(env.ctx)
    j = _job(env, job2.id)
    assert j.status == "failed" and j.error["code"] == "invalid_training_file" and "line 3" in j.error["message"]


# ----------------------------------------------------------------------------- state machine


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_claim_is_compare_and_set(env):
    job = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        assert state.claim_job(s, job.id, "w1", 60) is True
        assert state.claim_job(s, job.id, "w2", 60) is False  # second delivery: nothing happens
    j = _job(env, job.id)
    assert (j.status, j.worker_id, j.attempts) == ("running", "w1", 1)
    # a second delivery through run_job is a no-op too
    assert runner.run_job(job.id, env.ctx) == "skipped"
    assert _job(env, job.id).worker_id == "w1"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_cancel_queued_is_immediate(env):
    job = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        j = service.cancel_job(s, "tenant-a", job.id)
        s.commit()
        assert j.status == "cancelled" and j.finished_at
        with pytest.raises(SpecError) as e:
            service.get_job(s, "tenant-b", job.id)  # other tenant: as if missing
        assert e.value.status_code == 404
    assert runner.run_job(job.id, env.ctx) == "skipped"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_stale_heartbeat_requeues(env):
    job = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        assert state.claim_job(s, job.id, "dead-worker", 60)
        s.get(Job, job.id).heartbeat_at = time.time() - 5
        s.commit()
        assert state.requeue_stale_jobs(s, stale_after_s=1.0) == [job.id]
        s.commit()
    j = _job(env, job.id)
    assert j.status == "queued" and j.worker_id is None
    with env.sf() as s:  # the dead worker can no longer write
        assert state.heartbeat(s, job.id, "dead-worker") is False


def _lose_worker(env, job_id: str, worker: str, checkpoint_step: int | None = None) -> list[str]:
    """Claim the job as `worker`, optionally write a checkpoint, then let its heartbeat go stale."""
    with env.sf() as s:
        assert state.claim_job(s, job_id, worker, 60)
        job = s.get(Job, job_id)
        if checkpoint_step is not None:
            state.record_checkpoint(s, job, checkpoint_step, {}, None, "ft:x")
        job.heartbeat_at = time.time() - 5
        s.commit()
        ids = state.requeue_stale_jobs(s, stale_after_s=1.0)
        s.commit()
        return ids


def test_only_losses_without_checkpoint_progress_count_against_the_retry_budget(env):
    job = env.create({"model": "tiny", "training_file": env.add_file()})
    # five losses, each after a new checkpoint: infrastructure restarts, not the job's fault
    for i in range(5):
        assert _lose_worker(env, job.id, f"w{i}", checkpoint_step=10 * (i + 1)) == [job.id]
        assert _job(env, job.id).status == "queued"
    msgs = [e.message for e in _events(env, job.id)]
    assert "Worker lost; job requeued, resuming from step 50" in msgs
    # then MAX_ATTEMPTS losses in a row with no new checkpoint: the job is at fault
    for i in range(state.MAX_ATTEMPTS - 1):
        assert _lose_worker(env, job.id, f"stuck{i}") == [job.id]
    assert _lose_worker(env, job.id, "stuck-last") == []
    j = _job(env, job.id)
    assert j.status == "failed" and j.error["code"] == "worker_lost", j.error


def test_a_job_that_never_checkpoints_fails_after_max_attempts_losses(env):
    job = env.create({"model": "tiny", "training_file": env.add_file()})
    for i in range(state.MAX_ATTEMPTS - 1):
        assert _lose_worker(env, job.id, f"w{i}") == [job.id]
    assert "Worker lost; job requeued, resuming from the start (no checkpoint yet)" in [
        e.message for e in _events(env, job.id)]
    assert _lose_worker(env, job.id, "last") == [] and _job(env, job.id).status == "failed"


def test_the_jobs_of_a_worker_known_dead_are_requeued_at_the_next_monitor_pass(env):
    a = env.create({"model": "tiny", "training_file": env.add_file()})
    b = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        assert state.claim_job(s, a.id, "host:123:abcd", 60) and state.claim_job(s, b.id, "host:1234:ef", 60)
        assert state.expire_worker(s, "host:123:") == 1  # not host:1234
        s.commit()
    env.sent.clear()
    assert check_once(env.ctx) == [a.id] and env.sent == [a.id]  # heartbeats are fresh: only a's went
    assert _job(env, a.id).status == "queued" and _job(env, b.id).status == "running"


# ----------------------------------------------------------------------------- running


def test_run_prefix_job_end_to_end(env):
    job = env.create({"model": "tiny", "training_file": env.add_file(), "suffix": "colors", "seed": 7,
                      **{"method": SMALL}})
    assert runner.run_job(job.id, env.ctx) == "succeeded"
    j = _job(env, job.id)
    assert j.status == "succeeded" and j.error is None and j.finished_at
    assert j.fine_tuned_model == f"ft:tiny:tenant-a:colors:{job.id}"
    assert j.trained_tokens and j.trained_tokens > 0
    assert j.hyperparameters["n_epochs"] == 2 and isinstance(j.hyperparameters["learning_rate"], float)
    with env.sf() as s:
        rec = s.get(ModelRecord, j.fine_tuned_model)
        assert rec.kind == "adapter" and rec.tenant_id == "tenant-a" and rec.base_id == "tiny"
        assert rec.num_virtual_tokens == 4 and rec.fingerprint == s.get(ModelRecord, "tiny").fingerprint
        from app.ml.adapter import adapter_from_bytes

        adapter = adapter_from_bytes(env.blobs.get_bytes(rec.blob_key))
        assert adapter.base_fingerprint == rec.fingerprint
        ckpts = s.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)).all()
        assert ckpts and all(c.metrics["step"] == c.step_number for c in ckpts)
        assert ckpts[0].fine_tuned_model_checkpoint.startswith(j.fine_tuned_model + ":ckpt-step-")
        # results CSV: base vs adapter on the 10% held-out split
        (rf,) = j.result_files
        f = s.get(File, rf)
        assert f.purpose == "fine-tune-results" and f.tenant_id == "tenant-a"
        rows = list(csv.DictReader(io.StringIO(env.blobs.get_bytes(f.blob_key).decode())))
        assert [r["model"] for r in rows] == ["tiny", j.fine_tuned_model]
        assert all(r["exact_match"] != "" and r["bleu"] != "" and r["loss"] != "" for r in rows)
    events = _events(env, job.id)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "valid_loss", "tokens_per_s"} <= set(metrics[0].data)
    steps = [e.data["step"] for e in metrics]
    assert all(b - a <= 10 for a, b in zip([0] + steps, steps, strict=False))
    assert events[-1].message == "The job has successfully completed"
    # checkpoint blobs are cleaned up after success
    assert env.blobs.list(f"checkpoints/tenant-a/{job.id}/") == []

    # a second job continues from this adapter (init 'adapter'), with a longer prefix
    job2 = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(20)), "method": {
        "type": "prefix", "prefix": {"init": "adapter", "init_adapter": j.fine_tuned_model, "num_virtual_tokens": 6,
                                     "hyperparameters": {"n_epochs": 1, "batch_size": 16}}}})
    assert runner.run_job(job2.id, env.ctx) == "succeeded"
    j2 = _job(env, job2.id)
    assert j2.method["prefix"]["init"] == "adapter" and j2.method["prefix"]["num_virtual_tokens"] == 6
    # another tenant cannot start from it
    with pytest.raises(SpecError) as e:
        env.create({"model": "tiny", "training_file": env.add_file(tenant="tenant-b"), "method": {
            "type": "prefix", "prefix": {"init": "adapter", "init_adapter": j.fine_tuned_model}}}, "tenant-b")
    assert e.value.status_code == 404 and e.value.param == "method.prefix.init_adapter"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_cancel_stops_a_running_job(env):
    body = {"model": "tiny", "training_file": env.add_file(rows=_dataset(200)),
            "method": {"type": "prefix", "prefix": {"num_virtual_tokens": 4,
                                                    "hyperparameters": {"n_epochs": 100, "batch_size": 2}}}}
    job = env.create(body)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", runner.run_job(job.id, env.ctx)))
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any(e.type == "metrics" for e in _events(env, job.id)):
        time.sleep(0.1)
    with env.sf() as s:
        j = service.cancel_job(s, "tenant-a", job.id)
        s.commit()
        assert j.status == "running" and j.cancel_requested
    asked = time.time()
    t.join(timeout=30)
    assert not t.is_alive() and out["r"] == "cancelled"
    assert time.time() - asked < 10
    j = _job(env, job.id)
    assert j.status == "cancelled" and j.fine_tuned_model is None


def test_suspending_the_tenant_stops_its_job(env):
    job = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(200)), "method": {
        "type": "prefix", "prefix": {"num_virtual_tokens": 4, "hyperparameters": {"n_epochs": 100, "batch_size": 2}}}})
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", runner.run_job(job.id, env.ctx)))
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and _job(env, job.id).status != "running":
        time.sleep(0.1)
    with env.sf() as s:
        s.get(Tenant, "tenant-a").suspended = True
        s.commit()
    t.join(timeout=30)
    assert not t.is_alive() and out["r"] == "failed"
    assert _job(env, job.id).error["code"] == "tenant_suspended"


class _Killed(BaseException):
    """Stands in for a worker process dying: nothing below `run_job` catches it."""


def _run_until_killed_at_second_checkpoint(env, job, monkeypatch) -> list[int]:
    """Run the job in this process and kill it right after its second checkpoint is stored; the
    steps it checkpointed."""
    original = runner.JobCallbacks.on_checkpoint
    seen = []

    def dying(self, step, metrics):
        original(self, step, metrics)
        seen.append(step)
        if len(seen) == 2:
            raise _Killed()

    monkeypatch.setattr(runner.JobCallbacks, "on_checkpoint", dying)
    with pytest.raises(_Killed):
        runner.run_job(job.id, env.ctx)
    monkeypatch.setattr(runner.JobCallbacks, "on_checkpoint", original)
    return seen


def test_dead_worker_job_resumes_from_checkpoint(env, monkeypatch):
    # < 50 rows: no held-out split, so no final evaluation (kept short)
    job = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(40)), "method": {
        "type": "prefix", "prefix": {"num_virtual_tokens": 4, "hyperparameters": {"n_epochs": 2, "batch_size": 8}}}})
    seen = _run_until_killed_at_second_checkpoint(env, job, monkeypatch)
    assert _job(env, job.id).status == "running"
    assert env.blobs.list(f"checkpoints/tenant-a/{job.id}/")  # the checkpoint survived in storage
    time.sleep(1.3)  # heartbeat goes stale (job_stale_after_s=1)
    env.sent.clear()
    assert check_once(env.ctx) == [job.id] and env.sent == [job.id]
    assert _job(env, job.id).status == "queued"
    assert runner.run_job(job.id, env.ctx) == "succeeded"
    j = _job(env, job.id)
    assert j.attempts == 2
    msgs = [e.message for e in _events(env, job.id)]
    assert any(m.startswith("Resuming from checkpoint step-") for m in msgs)
    assert any("Worker lost; job requeued" in m for m in msgs)
    ckpt_step = seen[-1]
    assert f"Worker lost; job requeued, resuming from step {ckpt_step}" in msgs
    first_resumed_metrics = [e.data["step"] for e in _events(env, job.id) if e.type == "metrics"]
    # the resumed run continued after the checkpoint step rather than from step 1
    assert first_resumed_metrics.count(1) == 1
    # the steps it redid after the checkpoint are not reported twice
    assert first_resumed_metrics == sorted(set(first_resumed_metrics))


def test_training_error_fails_cleanly(env, monkeypatch):
    job = env.create({"model": "tiny", "training_file": env.add_file(), "method": SMALL})

    def boom(*a, **k):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(runner, "train_prefix", boom)
    assert runner.run_job(job.id, env.ctx) == "failed"
    j = _job(env, job.id)
    assert j.status == "failed" and j.error["code"] == "training_error"
    assert "out of cheese" in j.error["message"] and "Traceback" not in j.error["message"]


def test_running_quota_defers(env):
    env.settings.max_running_jobs_per_tenant = 1
    a = env.create({"model": "tiny", "training_file": env.add_file()})
    b = env.create({"model": "tiny", "training_file": env.add_file()})
    with env.sf() as s:
        assert state.claim_job(s, a.id, "w1", 60)
    env.sent.clear()
    assert runner.run_job(b.id, env.ctx) == "deferred"
    assert env.sent == [] and _job(env, b.id).status == "queued"
    # its outbox entry is due again after the deferral's delay: sent then, not before
    assert outbox.relay(env.ctx) == []
    assert outbox.relay(env.ctx, now=time.time() + 5) == [b.id] and env.sent == [b.id]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_pagination(env):
    fid = env.add_file()
    ids = [env.create({"model": "tiny", "training_file": fid}).id for _ in range(5)]
    with env.sf() as s:
        p1 = service.list_jobs(s, "tenant-a", None, 2)
        p2 = service.list_jobs(s, "tenant-a", p1["data"][-1]["id"], 2)
        p3 = service.list_jobs(s, "tenant-a", p2["data"][-1]["id"], 2)
        got = [j["id"] for p in (p1, p2, p3) for j in p["data"]]
        assert sorted(got) == sorted(ids) and len(set(got)) == 5
        assert p1["has_more"] and p2["has_more"] and not p3["has_more"]
        assert service.list_jobs(s, "tenant-b", None, 10)["data"] == []
        for i in range(3):
            state.add_event(s, ids[0], f"e{i}", tenant_id="tenant-a")
        s.commit()
        e1 = service.list_events(s, "tenant-a", ids[0], None, 2)
        e2 = service.list_events(s, "tenant-a", ids[0], e1["data"][-1]["id"], 2)
        assert [e["message"] for e in e1["data"]] == ["e2", "e1"] and e1["has_more"]
        assert e2["data"][0]["message"] == "e0"
        with pytest.raises(SpecError) as e:
            service.list_events(s, "tenant-a", ids[0], None, 101)
        assert e.value.param == "limit"
        with pytest.raises(SpecError):
            service.list_events(s, "tenant-b", ids[0], None, 10)


def _corpus_file(env) -> str:
    text = "\n\n".join(f"The {c} fox number {i} jumps over the lazy dog near the river bank."
                       for i in range(40) for c in ("red", "blue"))
    with env.sf() as s:
        f = File(tenant_id="tenant-a", filename="corpus.txt", purpose="base-train", bytes=len(text),
                 status="processed", blob_key="x")
        s.add(f)
        s.flush()
        f.blob_key = f"files/tenant-a/{f.id}"
        env.blobs.put_bytes(f.blob_key, text.encode())
        s.commit()
        return f.id


def test_base_job_registers_a_tenant_base(env):
    fid = _corpus_file(env)
    job = env.create({"model": "scratch", "training_file": fid, "suffix": "mini", "method": {
        "type": "base", "base": {"architecture": "llama", "size": "tiny", "hyperparameters": {"n_epochs": 1}}}})
    assert runner.run_job(job.id, env.ctx) == "succeeded"
    j = _job(env, job.id)
    assert j.fine_tuned_model.startswith("mini-")
    with env.sf() as s:
        rec = s.get(ModelRecord, j.fine_tuned_model)
        assert rec.kind == "base" and rec.tenant_id == "tenant-a" and rec.job_id == job.id
    assert any(e.type == "metrics" for e in _events(env, job.id))
    # prefix jobs may target it; another tenant cannot see it
    ok = env.create({"model": j.fine_tuned_model, "training_file": env.add_file()})
    assert ok.status == "queued"
    with pytest.raises(SpecError) as e:
        env.create({"model": j.fine_tuned_model, "training_file": env.add_file(tenant="tenant-b")}, "tenant-b")
    assert e.value.status_code == 404 and e.value.param == "model"


def test_a_base_job_taken_from_its_worker_before_it_finishes_registers_nothing(env, monkeypatch):
    """The job is requeued elsewhere while its worker uploads the new base: that worker's success
    write loses the compare-and-set, so no model record commits and its uploaded files go."""
    import app.store.base_registry

    fid = _corpus_file(env)
    job = env.create({"model": "scratch", "training_file": fid, "suffix": "gone", "method": {
        "type": "base", "base": {"architecture": "llama", "size": "tiny", "hyperparameters": {"n_epochs": 1}}}})
    real_upload = app.store.base_registry.upload_base

    def upload_then_lose(*args, **kwargs):
        out = real_upload(*args, **kwargs)
        with env.sf() as s:  # meanwhile the monitor handed the job to another worker
            s.get(Job, job.id).worker_id = "another-worker"
            s.commit()
        return out

    monkeypatch.setattr(runner, "upload_base", upload_then_lose)
    assert runner.run_job(job.id, env.ctx) == "lost"
    with env.sf() as s:
        assert s.scalars(select(ModelRecord).where(ModelRecord.job_id == job.id)).all() == []
        assert s.get(Job, job.id).status == "running"  # the new holder's, untouched
    assert [k for k in env.blobs.list("bases/") if k.startswith("bases/gone-")] == []


def test_base_job_continuing_a_base_frees_the_cached_base_and_loads_none(env, monkeypatch):
    """The worker keeps one base loaded for prefix jobs; a base job trains its own copy from the
    directory, so it drops the cached one (on a GPU, memory that training needs) and loads none."""
    runner._BASE_CACHE["stale"] = object()
    loaded = []
    monkeypatch.setattr(runner, "load_base_cached", lambda *a, **k: loaded.append(a))
    fid = _corpus_file(env)
    job = env.create({"model": "tiny", "training_file": fid, "method": {
        "type": "base", "base": {"hyperparameters": {"n_epochs": 1}}}})
    assert runner.run_job(job.id, env.ctx) == "succeeded", _job(env, job.id).error
    assert loaded == [] and "stale" not in runner._BASE_CACHE


def test_dead_worker_base_job_resumes_from_checkpoint(env, monkeypatch):
    body = {"model": "scratch", "training_file": _corpus_file(env), "seed": 5, "method": {
        "type": "base", "base": {"architecture": "llama", "size": "tiny", "hyperparameters": {"n_epochs": 3}}}}
    reference = env.create(body)  # the same job, never interrupted
    assert runner.run_job(reference.id, env.ctx) == "succeeded"

    job = env.create(body)
    seen = _run_until_killed_at_second_checkpoint(env, job, monkeypatch)
    prefix = f"checkpoints/tenant-a/{job.id}/"
    assert _job(env, job.id).status == "running"
    assert {k[len(prefix):].split("/")[0] for k in env.blobs.list(prefix)} == {f"step-{s:08d}" for s in seen}
    # another machine: nothing of the dead worker's local files is left
    import shutil

    shutil.rmtree(env.settings.data_dir / "jobs" / job.id)
    time.sleep(1.3)  # heartbeat goes stale (job_stale_after_s=1)
    assert check_once(env.ctx) == [job.id] and _job(env, job.id).status == "queued"
    assert runner.run_job(job.id, env.ctx) == "succeeded"

    j = _job(env, job.id)
    assert j.attempts == 2
    msgs = [e.message for e in _events(env, job.id)]
    assert f"Resuming from checkpoint step-{seen[-1]:08d}" in msgs
    metric_steps = [e.data["step"] for e in _events(env, job.id) if e.type == "metrics"]
    assert metric_steps.count(1) == 1 and seen[-1] + 1 in metric_steps  # continued, not restarted
    with env.sf() as s:
        listed = service.list_checkpoints(s, "tenant-a", job.id, None, 100)["data"]
        assert [c["step_number"] for c in listed][-2:] == seen[::-1]
        assert listed[0]["fine_tuned_model_checkpoint"].startswith(f"{j.fine_tuned_model}:ckpt-step-")
        ref = s.get(ModelRecord, _job(env, reference.id).fine_tuned_model)
        # the resumed job trained exactly the weights of the uninterrupted one (tokenizer included)
        assert s.get(ModelRecord, j.fine_tuned_model).fingerprint == ref.fingerprint
    assert env.blobs.list(prefix) == []  # checkpoint blobs go when the job ends


def test_a_worker_without_its_device_fails_jobs_with_the_reason(monkeypatch):
    from app.config import Settings
    from app.jobs.runner import JobFailure, job_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert job_device(Settings()) == torch.device("cpu")
    with pytest.raises(JobFailure) as e:
        job_device(Settings(device="cuda:0"))
    assert e.value.code == "device_unavailable" and "no CUDA device" in e.value.message and "DEVICE" in e.value.message


# ----------------------------------------------------------------------------- prefix-length search


def test_a_length_search_job_records_its_rungs_its_curve_and_its_choice(env):
    method = {"type": "prefix", "prefix": {"num_virtual_tokens": {"search": [1, 4, 8]},
                                           "hyperparameters": {"n_epochs": 2, "batch_size": 16}}}
    job = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(80)), "method": method})
    assert runner.run_job(job.id, env.ctx) == "succeeded"
    j = _job(env, job.id)
    prefix = j.method["prefix"]
    search = prefix["length_search"]
    assert search["candidates"] == [1, 4, 8] and search["tolerance"] == 0.02
    assert prefix["num_virtual_tokens"] in (1, 4, 8)
    assert {c["num_virtual_tokens"] for c in search["curve"]} == {1, 4, 8}
    messages = [e.message for e in _events(env, job.id)]
    assert sum(m.startswith("Length search at step") for m in messages) == 2  # 3 -> 2 -> 1
    assert f"Chose a prefix of {prefix['num_virtual_tokens']} virtual tokens" in messages
    with env.sf() as s:
        rec = s.scalars(select(ModelRecord).where(ModelRecord.job_id == job.id)).one()
        assert rec.num_virtual_tokens == prefix["num_virtual_tokens"]


@pytest.mark.parametrize("value", [{"search": []}, {"search": [4, 513]}, {"search": [0]}, "longest"])
def test_bad_search_lists_name_the_length(env, value):
    method = {"type": "prefix", "prefix": {"num_virtual_tokens": value}}
    with pytest.raises(SpecError) as e:
        env.create({"model": "tiny", "training_file": env.add_file(), "method": method})
    assert e.value.param == "method.prefix.num_virtual_tokens"
