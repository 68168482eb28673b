"""A full disk, with the faults injected in-process: a blob store whose writes raise
OSError(ENOSPC), a database that answers SQLITE_FULL, and a free-space reading of nothing. The
same on a real small filesystem, with a real API process: tests/integration/test_storage_full_disk.py."""

from __future__ import annotations

import errno
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from app.config import Settings
from app.jobs import outbox, runner
from app.store import storage
from app.store.blobs import LocalBlobStore
from app.store.storage import StorageFullError, is_storage_full
from app.store.tables import File, JobEvent
from tests.jobs.conftest import dataset_rows as _dataset


class FullBlobStore:
    """Wraps a store; while `full` (a bool, or a function of the key), writes raise ENOSPC as a
    real disk would."""

    def __init__(self, inner, full=True, writes=("put_bytes", "put_file", "put_stream")):
        self.inner, self.full, self.writes = inner, full, writes
        self.refused: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.writes:
            return attr

        def write(key, *a, **k):
            if self.full(key) if callable(self.full) else self.full:
                self.refused.append(key)
                raise OSError(errno.ENOSPC, "No space left on device")
            return attr(key, *a, **k)
        return write


def _sqlite_full() -> sqlite3.OperationalError:
    e = sqlite3.OperationalError("database or disk is full")
    e.sqlite_errorcode = 13  # SQLITE_FULL
    return e


def test_every_form_of_a_full_disk_is_recognised():
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_storage_full(_sqlite_full())
    # safetensors keeps only the OS's words
    assert is_storage_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert is_storage_full(wrapped)
    assert not is_storage_full(OSError(errno.ENOENT, "No such file"))
    assert not is_storage_full(ValueError("bad"))


def test_a_blob_write_below_the_floor_is_refused_before_it_starts(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs", min_free_bytes=storage.free_bytes(tmp_path) + 10**12)
    with pytest.raises(StorageFullError, match="storage is full"):
        store.put_bytes("files/t/a", b"x" * 100)
    assert store.list("") == [] and list((tmp_path / "blobs" / ".tmp").iterdir()) == []
    # ENOSPC in the middle of a write is the same error, and leaves no temp file behind
    store.min_free_bytes = 0

    class Spool:
        def __init__(self):
            self.n = 0

        def read(self, size=-1):
            self.n += 1
            if self.n > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return b"y" * 10

    with pytest.raises(StorageFullError):
        store.put_stream("files/t/b", Spool())
    assert store.list("") == [] and list((tmp_path / "blobs" / ".tmp").iterdir()) == []


# ----------------------------------------------------------------------------- the API


@pytest.fixture()
def api(tmp_path):
    from app.main import create_app

    settings = Settings(data_dir=tmp_path / "data", serving_enabled=False, admin_api_key="sk-admin-test",
                        storage_reserve_bytes=64 * 1024, storage_min_free_bytes=0)
    app = create_app(settings)
    with TestClient(app) as c:
        admin = {"Authorization": "Bearer sk-admin-test"}
        r = c.post("/v1/admin/tenants", json={"name": "full"}, headers=admin)
        assert r.status_code == 201, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['api_key']}"
        yield app, c


def _upload(c, data: bytes = b'{"prompt": "a", "completion": "b"}\n'):
    return c.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})


def _assert_507(r):
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "storage_full" and err["type"] == "insufficient_storage_error"
    assert "storage is full" in err["message"] and "Traceback" not in err["message"]
    assert r.headers["x-should-retry"] == "false"


def test_upload_on_a_full_blob_store_is_507_storage_full_and_stores_nothing(api):
    app, c = api
    full = app.state.blobs = FullBlobStore(app.state.blobs)
    _assert_507(_upload(c))
    assert full.refused and c.get("/v1/files").json()["data"] == []
    with app.state.session_factory() as s:
        assert s.scalars(select(File)).all() == []
    full.full = False
    assert _upload(c).status_code == 200


def test_readyz_reports_a_full_disk(api, monkeypatch):
    app, c = api
    assert c.get("/readyz").json()["checks"]["storage"] == "ok"
    monkeypatch.setattr(storage, "free_bytes", lambda path: 4096)
    # a serving engine that is ready, so that the storage alone decides
    monkeypatch.setattr(app.state, "serving", type("S", (), {"ready": True})(), raising=False)
    r = c.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "degraded" and body["checks"]["storage"].startswith("full: 0.0 MiB free")
    assert "/" not in body["checks"]["storage"]  # no paths on the unauthenticated probe


def test_delete_works_while_the_database_is_full(api):
    """The database refuses every write while the reserve is there: the delete must release it."""
    app, c = api
    settings = app.state.settings
    reserve = storage.reserve_path(settings)
    assert reserve.is_file() and reserve.stat().st_size == settings.storage_reserve_bytes
    fid = _upload(c).json()["id"]
    with app.state.session_factory() as s:
        key = s.get(File, fid).blob_key
    assert app.state.blobs.exists(key)
    disk = {"full": True}

    @event.listens_for(app.state.engine, "before_cursor_execute")
    def full_disk(conn, cursor, statement, *a):
        if disk["full"] and reserve.exists() and statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise _sqlite_full()

    _assert_507(_upload(c, b'{"prompt": "c", "completion": "d"}\n'))  # the row cannot be written
    r = c.delete(f"/v1/files/{fid}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": fid, "object": "file", "deleted": True}
    assert c.get(f"/v1/files/{fid}").status_code == 404
    assert not app.state.blobs.exists(key)  # the blob went too (first)
    assert not app.state.blobs.list("files/")  # and the refused upload left none
    disk["full"] = False
    fid2 = _upload(c).json()["id"]
    assert c.delete(f"/v1/files/{fid2}").status_code == 200
    assert reserve.is_file()  # made again once there was room


# ----------------------------------------------------------------------------- jobs


SMALL = {"type": "prefix", "prefix": {"num_virtual_tokens": 4, "hyperparameters": {"n_epochs": 2, "batch_size": 8}}}


def _storage_events(env, job_id):
    with env.sf() as s:
        return [e for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
                if isinstance(e.data, dict) and e.data.get("storage_full")]


def test_a_job_that_finds_the_storage_full_is_requeued_and_resumes(env):
    env.settings.job_storage_full_retry_delay_s = 7.0
    job = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(40)), "method": SMALL})
    # the first checkpoint is stored; the disk is full from the second on
    checkpoints: list[str] = []

    def full(key):  # checkpoints/{tenant}/{job}/step-N/...
        if key.split("/")[3] not in checkpoints:
            checkpoints.append(key.split("/")[3])
        return len(checkpoints) > 1

    env.ctx.blobs = FullBlobStore(env.blobs, full=full, writes=("put_file",))
    assert runner.run_job(job.id, env.ctx) == "requeued"
    with env.sf() as s:
        j = s.get(type(job), job.id)
        assert j.status == "queued" and j.error is None and j.worker_id is None
        (entry,) = outbox.pending(s, [job.id])
        assert entry.not_before > time.time() + 5  # its message is due after the delay, not before
    (ev,) = _storage_events(env, job.id)
    step = ev.data["resume_step"]
    assert step > 0 and ev.level == "warning"
    assert ev.message == f"Storage full; job requeued, resuming from step {step} in 7 s (retry 1 of 3)"
    env.sent.clear()
    assert outbox.relay(env.ctx) == [] and env.sent == []
    assert outbox.relay(env.ctx, now=time.time() + 8) == [job.id] and env.sent == [job.id]
    assert env.blobs.list(f"checkpoints/tenant-a/{job.id}/")  # kept for the resume
    assert not (env.settings.data_dir / "jobs" / job.id).exists()  # local copies dropped
    # space is back: the retry resumes from that checkpoint and succeeds
    env.ctx.blobs = env.blobs
    assert runner.run_job(job.id, env.ctx) == "succeeded"
    with env.sf() as s:
        msgs = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job.id))]
    assert f"Resuming from checkpoint step-{step:08d}" in msgs, "\n".join(msgs)


def test_a_job_fails_with_storage_full_once_its_retries_are_spent(env):
    env.settings.job_storage_full_retries = 1
    env.settings.job_storage_full_retry_delay_s = 0.0
    job = env.create({"model": "tiny", "training_file": env.add_file(rows=_dataset(40)), "method": SMALL})
    env.ctx.blobs = FullBlobStore(env.blobs)  # nothing can be stored at all
    assert runner.run_job(job.id, env.ctx) == "requeued"
    env.sent.clear()
    assert outbox.relay(env.ctx) == [job.id] and env.sent == [job.id]  # due at once (no delay)
    assert runner.run_job(job.id, env.ctx) == "failed"
    with env.sf() as s:
        j = s.get(type(job), job.id)
    assert j.status == "failed" and j.error["code"] == "storage_full"
    assert "create the job again" in j.error["message"] and "Traceback" not in j.error["message"]
    assert len(_storage_events(env, job.id)) == 1
