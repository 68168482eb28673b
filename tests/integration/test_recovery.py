"""What a crashed API replica leaves behind, repaired by the running service's monitor (real
processes): a file it accepted but never validated, and blobs without rows."""

from __future__ import annotations

import json
import os
import time

import pytest
from sqlalchemy import select

from app.store.db import make_engine, make_session_factory
from app.store.tables import File
from tests.integration.conftest import ServiceProcess

pytestmark = pytest.mark.integration

ROWS = "".join(json.dumps({"prompt": f"item {i} ->", "completion": " warm"}) + "\n" for i in range(8))


def _session(svc: ServiceProcess):
    return make_session_factory(make_engine(f"sqlite:///{svc.data_dir / 'prefixd.db'}"))


def _wait(cond, timeout: float, what: str, svc: ServiceProcess):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"{what}\n{svc.log()}"
        time.sleep(0.2)
    return value


def test_file_left_uploaded_by_a_dead_replica_is_validated_and_its_job_proceeds(embedded_service):
    """The row and blob of an upload whose replica died before validating it, written as that
    replica left them: the running service's monitor validates the file past
    FILE_VALIDATION_GRACE_S (60 s; the row is dated 2 minutes back) and the job is queued."""
    svc = embedded_service
    t = svc.make_tenant()
    base = _wait(lambda: [m["id"] for m in t.client.get("/v1/models").json()["data"]
                          if not m["id"].startswith("ft:")], 120, "no base model", svc)[0]
    fid = f"file-{os.urandom(12).hex()}"
    key = f"files/{t.id}/{fid}"
    path = svc.data_dir / "blobs" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ROWS.encode())
    sf = _session(svc)
    with sf() as s:
        s.add(File(id=fid, tenant_id=t.id, filename="d.jsonl", purpose="fine-tune", bytes=len(ROWS),
                   status="uploaded", blob_key=key, created_at=int(time.time()) - 120))
        s.commit()
    r = t.client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": fid,
                                                    "method": {"type": "prefix", "prefix": {}}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "validating_files"
    f = _wait(lambda: (b := t.client.get(f"/v1/files/{fid}").json())["status"] != "uploaded" and b, 15,
              "file never validated", svc)
    assert (f["status"], f["row_count"]) == ("processed", 8)
    _wait(lambda: t.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued", 10,
          "job never queued", svc)
    with sf() as s:
        assert s.scalar(select(File.validation_claimed_at).where(File.id == fid)) is not None


def test_orphans_left_by_a_crashed_api_are_swept(start_service):
    """A blob stored without its row and a `.tmp/.put-*` file, planted as an API killed mid-upload
    leaves them, next to a real upload: with ORPHAN_BLOB_GRACE_S=2 the running service's monitor
    deletes both orphans within seconds, and the real upload, as old by then, still reads back."""
    svc = start_service(env={"ORPHAN_BLOB_GRACE_S": "2", "JOB_MONITOR_INTERVAL_S": "0.5",
                             "SERVING_ENABLED": "0"})
    t = svc.make_tenant()
    kept = t.client.post("/v1/files", files={"file": ("k.jsonl", ROWS.encode())}, data={"purpose": "fine-tune"})
    assert kept.status_code == 200, kept.text
    blobs = svc.data_dir / "blobs"
    orphan = blobs / "files" / t.id / f"file-{os.urandom(12).hex()}"
    orphan.write_bytes(b"stored, then the API died")
    temp = blobs / ".tmp" / ".put-crashed"
    temp.write_bytes(b"half an upload")
    _wait(lambda: not orphan.exists() and not temp.exists(), 15, "orphans not swept", svc)
    with _session(svc)() as s:
        rows = set(s.scalars(select(File.blob_key)))
    stored = {p.relative_to(blobs).as_posix() for p in (blobs / "files").rglob("*") if p.is_file()}
    assert stored and stored <= rows
    r = t.client.get(f"/v1/files/{kept.json()['id']}/content")
    assert r.status_code == 200 and r.content == ROWS.encode()
    assert "deleted 1 orphan blob(s) and 1 half-written upload(s)" in svc.log(200)
