"""The monitor's repairs after a crash (app.jobs.recovery), called directly: SQLite through the real
migrations, local blobs and S3 (a moto server), an enqueue that records ids."""

from __future__ import annotations

import json
import os
import time

from sqlalchemy import select

from app.config import Settings
from app.jobs import recovery
from app.jobs.context import JobContext
from app.jobs.monitor import check_once
from app.store.blobs import LocalBlobStore, S3BlobStore
from app.store.tables import File, Job, JobCheckpoint, ModelRecord, Tenant

GOOD = "".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(3)).encode()


class Env:
    def __init__(self, tmp_path, blobs=None, **settings):
        from app.store.db import init_db, make_engine, make_session_factory

        self.settings = Settings(data_dir=tmp_path, **settings)
        engine = make_engine(self.settings.resolved_database_url)
        init_db(engine)
        self.sf = make_session_factory(engine)
        self.blobs = blobs or LocalBlobStore(tmp_path / "blobs")
        self.sent: list[str] = []
        self.ctx = JobContext(self.settings, self.sf, self.blobs,
                              enqueue=lambda job_id, countdown=None: self.sent.append(job_id))
        with self.sf() as s:
            s.add(Tenant(id="tenant-a", name="a"))
            s.commit()

    def add(self, *rows):
        with self.sf() as s:
            s.add_all(rows)
            s.commit()

    def get(self, model, id_):
        with self.sf() as s:
            return s.get(model, id_)


def _file(fid: str, age_s: float, data: bytes = GOOD, claimed_at: float | None = None, **kw) -> File:
    return File(id=fid, tenant_id="tenant-a", filename="d.jsonl", purpose=kw.pop("purpose", "fine-tune"),
                bytes=len(data), status="uploaded", blob_key=f"files/tenant-a/{fid}",
                created_at=int(time.time() - age_s), validation_claimed_at=claimed_at, **kw)


def _job(jid: str, fid: str, status: str = "validating_files") -> Job:
    return Job(id=jid, tenant_id="tenant-a", kind="prefix", model="tiny", training_file=fid, status=status)


# ----------------------------------------------------------------------------- files left uploaded


def test_monitor_validates_a_file_its_dead_replica_left_uploaded_and_the_job_moves_on(tmp_path):
    env = Env(tmp_path, file_validation_grace_s=30)
    for fid, data in (("file-stuck", GOOD), ("file-bad", b"not json\n"), ("file-fresh", GOOD)):
        env.blobs.put_bytes(f"files/tenant-a/{fid}", data)
    env.add(_file("file-stuck", 60), _file("file-bad", 60, b"not json\n"), _file("file-fresh", 5),
            _job("ftjob-a", "file-stuck"), _job("ftjob-b", "file-bad"))
    assert check_once(env.ctx) == ["ftjob-a"] and env.sent == ["ftjob-a"]  # one pass: validated, queued
    f = env.get(File, "file-stuck")
    assert (f.status, f.row_count) == ("processed", 3) and f.validation_claimed_at is not None
    assert env.get(File, "file-bad").status == "error"
    assert env.get(Job, "ftjob-b").status == "failed"
    assert env.get(File, "file-fresh").status == "uploaded"  # its replica may still be on it


def test_file_claim_is_compare_and_set(tmp_path):
    env = Env(tmp_path, file_validation_grace_s=30)
    now = time.time()
    env.add(_file("file-taken", 60, claimed_at=now - 5), _file("file-lost", 60, claimed_at=now - 40),
            _file("file-new", 60))
    seen: list[str] = []
    assert sorted(recovery.recover_uploaded_files(env.ctx, seen.append)) == ["file-lost", "file-new"]
    # a second monitor at the same moment finds nothing left to claim
    assert recovery.recover_uploaded_files(env.ctx, seen.append) == []
    assert sorted(seen) == ["file-lost", "file-new"]
    # a claim older than the grace period was lost with its claimer: taken again
    assert sorted(recovery.recover_uploaded_files(env.ctx, seen.append, now=now + 31)) == \
        ["file-lost", "file-new", "file-taken"]


# ----------------------------------------------------------------------------- orphan blobs


def test_every_blob_key_column_is_found():
    cols = {f"{c.table.name}.{c.name}" for c in recovery.blob_key_columns()}
    assert cols == {"files.blob_key", "models.blob_key", "job_checkpoints.blob_key"}
    from app.store.tables import Base

    named_blob = {f"{t.name}.{c.name}" for t in Base.metadata.sorted_tables for c in t.columns if "blob" in c.name}
    assert named_blob == cols  # a column holding blob keys that the sweep misses would lose data


def _populate(env: Env) -> tuple[set[str], set[str]]:
    """Blobs that rows refer to (kept) and orphans, all written now; returns (kept, orphans)."""
    kept = {
        "files/tenant-a/file-1",                          # a file row
        "adapters/tenant-a/ftjob-done/adapter.zip",       # an adapter row
        "bases/tiny/config.json", "bases/tiny/tok/vocab.json",  # under a base's prefix
        "checkpoints/tenant-a/ftjob-done/step-4/state.json",    # a checkpoint row's prefix
        "checkpoints/tenant-a/ftjob-run/step-9/state.json",     # an unfinished job: no row yet
        "other/thing",                                    # not one of the service's kinds
    }
    orphans = {
        "files/tenant-a/file-crashed",                    # stored, then the API died
        "adapters/tenant-a/ftjob-gone/adapter.zip",
        "bases/tinyx/config.json",                        # shares a name prefix, not the directory
        "checkpoints/tenant-a/ftjob-done/step-8/state.json",   # a finished job's, without a row
    }
    for k in kept | orphans:
        env.blobs.put_bytes(k, b"x")
    env.add(
        File(id="file-1", tenant_id="tenant-a", filename="a", purpose="fine-tune", status="processed",
             blob_key="files/tenant-a/file-1"),
        ModelRecord(id="ft:x", kind="adapter", tenant_id="tenant-a", fingerprint="f",
                    blob_key="adapters/tenant-a/ftjob-done/adapter.zip"),
        ModelRecord(id="tiny", kind="base", fingerprint="f", blob_key="bases/tiny/"),
        _job("ftjob-done", "file-1", "succeeded"), _job("ftjob-run", "file-1", "queued"),
    )
    env.add(JobCheckpoint(job_id="ftjob-done", tenant_id="tenant-a", step_number=4, fine_tuned_model_checkpoint="c",
                          blob_key="checkpoints/tenant-a/ftjob-done/step-4/"))
    return kept, orphans


def test_sweep_deletes_old_orphans_and_stale_temp_files_only_local(tmp_path):
    env = Env(tmp_path)
    kept, orphans = _populate(env)
    fresh_orphan = "files/tenant-a/file-being-written"
    env.blobs.put_bytes(fresh_orphan, b"x")
    old = time.time() - 7200
    for k in kept | orphans:
        os.utime(env.blobs.root / k, (old, old))
    tmp = env.blobs.root / ".tmp"
    (tmp / ".put-stale").write_bytes(b"half")
    os.utime(tmp / ".put-stale", (old, old))
    (tmp / ".put-live").write_bytes(b"half")  # an upload in progress
    assert set(recovery.sweep_orphan_blobs(env.sf, env.blobs, 3600)) == orphans
    assert set(env.blobs.list()) == kept | {fresh_orphan}
    assert sorted(p.name for p in tmp.iterdir()) == [".put-live"]
    assert recovery.sweep_orphan_blobs(env.sf, env.blobs, 0) == []  # 0: off


def test_sweep_on_s3_deletes_orphans_and_aborts_stale_multipart_uploads(tmp_path, moto_endpoint):  # noqa: F811
    blobs = S3BlobStore(f"sweep-{os.urandom(4).hex()}", prefix="pfx", endpoint_url=moto_endpoint,
                        access_key="testing", secret_key="testing")
    env = Env(tmp_path, blobs=blobs)
    kept, orphans = _populate(env)
    blobs.client.put_object(Bucket=blobs.bucket, Key="elsewhere/files/x", Body=b"x")  # outside S3_PREFIX
    # S3 sets the times itself: everything is seconds old, so a grace period of 60 s keeps it all
    assert recovery.sweep_orphan_blobs(env.sf, blobs, 60) == []
    assert set(blobs.list()) == kept | orphans
    # ... and an hour from now the orphans are old. (moto dates every multipart upload 2010, so
    # only the abort of an old one can be checked here.)
    blobs.client.create_multipart_upload(Bucket=blobs.bucket, Key="pfx/files/tenant-a/file-half")
    assert set(recovery.sweep_orphan_blobs(env.sf, blobs, 60, now=time.time() + 3600)) == orphans
    assert set(blobs.list()) == kept
    assert blobs.client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", []) == []
    assert blobs.client.get_object(Bucket=blobs.bucket, Key="elsewhere/files/x")["Body"].read() == b"x"


def test_monitor_sweeps_once_per_interval(tmp_path):
    env = Env(tmp_path, orphan_blob_grace_s=40, job_monitor_interval_s=2)
    assert recovery.sweep_interval_s(env.settings) == 10
    assert recovery.maybe_sweep_orphans(env.ctx, now=100.0) == []
    assert recovery.maybe_sweep_orphans(env.ctx, now=105.0) is None
    assert recovery.maybe_sweep_orphans(env.ctx, now=110.0) == []
    env.settings.orphan_blob_grace_s = 0
    assert recovery.maybe_sweep_orphans(env.ctx, now=1000.0) is None


def test_monitor_pass_survives_a_failing_recovery_step(tmp_path, monkeypatch):
    env = Env(tmp_path)
    env.blobs.put_bytes("files/tenant-a/file-ok", GOOD)
    env.add(File(id="file-ok", tenant_id="tenant-a", filename="d.jsonl", purpose="fine-tune", status="processed",
                 blob_key="files/tenant-a/file-ok"), _job("ftjob-ok", "file-ok"))

    def boom(*_a, **_k):
        raise RuntimeError("storage down")

    monkeypatch.setattr(recovery, "sweep_orphan_blobs", boom)
    monkeypatch.setattr(recovery, "recover_uploaded_files", boom)
    assert check_once(env.ctx) == ["ftjob-ok"]
    with env.sf() as s:
        assert s.scalar(select(Job.status).where(Job.id == "ftjob-ok")) == "queued"
