"""Fixtures of the job domain's tests: a settings + SQLite (or PostgreSQL) + local blobs environment
with two tenants and the tiny base registered, and the dataset they train on."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from app.config import Settings
from app.jobs import service
from app.jobs.context import JobContext
from app.store.base_registry import register_base
from app.store.blobs import LocalBlobStore
from app.store.db import init_db, make_engine, make_session_factory
from app.store.tables import File, Job, Tenant


def dataset_rows(n: int = 60) -> list[dict]:
    # the label depends on one word of the prompt
    words = {"red": " warm", "orange": " warm", "yellow": " warm", "blue": " cold", "green": " cold",
             "purple": " cold"}
    rows = []
    for i in range(n):
        w = list(words)[i % len(words)]
        rows.append({"prompt": f"item {i} is {w} ->", "completion": words[w]})
    return rows


PG_ADMIN_DSN = os.environ.get("PREFIXD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture()
def database_url(request, tmp_path):
    """SQLite by default; tests parametrised with `env` = "postgresql" get a fresh database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
        return
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable: {e}")
    name = f"prefixd_jobs_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture()
def env(tmp_path, tiny_base_dirs, database_url):
    settings = Settings(data_dir=tmp_path, job_heartbeat_s=0.2, job_stale_after_s=1.0,
                        max_running_jobs_per_tenant=0, database_url=database_url)
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    sf = make_session_factory(engine)
    blobs = LocalBlobStore(tmp_path / "blobs")
    sent: list[str] = []
    ctx = JobContext(settings, sf, blobs, enqueue=lambda job_id, countdown=None: sent.append(job_id))
    with sf() as s:
        s.add_all([Tenant(id="tenant-a", name="a"), Tenant(id="tenant-b", name="b")])
        register_base(s, blobs, tiny_base_dirs["llama"], "tiny")
        s.commit()

    def add_file(tenant="tenant-a", rows=None, purpose="fine-tune", status="processed", details=None):
        data = "".join(json.dumps(r) + "\n" for r in (rows or dataset_rows())).encode()
        with sf() as s:
            f = File(tenant_id=tenant, filename="train.jsonl", purpose=purpose, bytes=len(data),
                     status=status, status_details=details, blob_key="x")
            s.add(f)
            s.flush()
            f.blob_key = f"files/{tenant}/{f.id}"
            blobs.put_bytes(f.blob_key, data)
            s.commit()
            return f.id

    def create(body, tenant="tenant-a") -> Job:
        with sf() as s:
            job = service.create_job(s, s.get(Tenant, tenant), body, settings)
            s.commit()
            return job

    yield type("Env", (), dict(settings=settings, sf=sf, blobs=blobs, ctx=ctx, sent=sent, add_file=add_file,
                               create=create))
    engine.dispose()
