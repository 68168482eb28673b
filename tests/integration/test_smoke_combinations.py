"""A short smoke flow for the six mixed backend combinations.

The three backend choices are independent: metadata (SQLite, or PostgreSQL via DATABASE_URL), Celery
broker (kombu's sqla+sqlite, or Redis via REDIS_URL), blobs (a local directory, or S3 via S3_*).
tests/integration/test_learning_flow.py runs the full flow on the two pure combinations (all
embedded, all distributed); here each of the other six gets its own API process and Celery worker
process, with only its distributed backends' env (`distributed_backends.env(db=, broker=, blobs=)`:
a fresh PostgreSQL database, Redis db index or S3 bucket on moto), and over HTTP:

1. an admin-made tenant uploads a small JSONL file; it validates, and its content round-trips
   byte-identically through the API and sits, byte-identical, in the combination's blob backend;
2. a prefix job with 4 virtual tokens and one epoch succeeds (the worker found the job row in the
   combination's database through the combination's broker, and the file in its blob backend);
   its CSV result file reads back; the job row and the broker's trace are where they should be;
3. one completion with the fine-tuned model answers 200 with usage; the adapter export (which the
   API reads from the blob the worker wrote) is a PEFT zip;
4. the training file is deleted: 404 afterwards and its blob is gone.

About 20 s per combination on 2 cores (two process starts and a few-step job).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# (PostgreSQL, Redis, S3) for the six combinations that are neither all-embedded nor all-distributed
COMBINATIONS = [(db, broker, blobs) for db in (False, True) for broker in (False, True) for blobs in (False, True)
                if len({db, broker, blobs}) == 2]
IDS = [f"{'postgres' if db else 'sqlite'}-{'redis' if broker else 'sqla'}-{'s3' if blobs else 'local'}"
       for db, broker, blobs in COMBINATIONS]

WORDS = {"red": " warm", "orange": " warm", "yellow": " warm", "blue": " cold", "green": " cold", "purple": " cold"}
KEYS = list(WORDS)
TRAIN = "".join(json.dumps({"prompt": f"item {i} is {KEYS[i % 6]} ->", "completion": WORDS[KEYS[i % 6]]}) + "\n"
                for i in range(60)).encode()  # >= 50 rows: a held-out split, so a result file
METHOD = {"type": "prefix", "prefix": {"num_virtual_tokens": 4,
                                       "hyperparameters": {"n_epochs": 1, "batch_size": 16}}}


def _until(fn, what: str, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


class Backends:
    """Direct (non-HTTP) views of where this combination keeps its state."""

    def __init__(self, svc, env: dict[str, str]):
        self.svc, self.env = svc, env
        self.data_dir: Path = svc.data_dir

    # -- blobs
    def blob(self, key: str) -> bytes | None:
        if "S3_BUCKET" in self.env:
            import boto3
            from botocore.exceptions import ClientError

            s3 = boto3.client("s3", endpoint_url=self.env["S3_ENDPOINT_URL"], region_name=self.env["S3_REGION"],
                              aws_access_key_id="testing", aws_secret_access_key="testing")
            try:
                return s3.get_object(Bucket=self.env["S3_BUCKET"], Key=key)["Body"].read()
            except ClientError as e:
                if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return None
                raise
        p = self.data_dir / "blobs" / key
        return p.read_bytes() if p.is_file() else None

    def local_blob_exists(self, key: str) -> bool:
        return (self.data_dir / "blobs" / key).exists()

    # -- metadata
    def job_row(self, job_id: str) -> tuple[str, str | None]:
        """(status, fine_tuned_model) of the job, read from the combination's database."""
        sql = "SELECT status, fine_tuned_model FROM jobs WHERE id = {}"
        if "DATABASE_URL" in self.env:
            import psycopg

            with psycopg.connect(self.env["DATABASE_URL"], connect_timeout=5) as conn:
                return conn.execute(sql.format("%s"), (job_id,)).fetchone()
        with sqlite3.connect(self.data_dir / "prefixd.db") as conn:
            return conn.execute(sql.format("?"), (job_id,)).fetchone()

    # -- broker
    def broker_trace(self, job_id: str) -> bool:
        """The broker the combination names carried the job's message (or at least its queue)."""
        if "REDIS_URL" in self.env:
            import redis

            r = redis.Redis.from_url(self.env["REDIS_URL"], socket_timeout=3)
            try:  # kombu's Redis transport binds the queue under _kombu.binding.<exchange>
                return any(k.startswith(b"_kombu.binding.") for k in r.keys("_kombu.*"))
            finally:
                r.close()
        # kombu's sqla transport keeps delivered messages (visible = 0); the task's body names the job
        with sqlite3.connect(self.data_dir / "broker.db") as conn:
            payloads = [row[0] for row in conn.execute("SELECT payload FROM kombu_message")]
        return any(job_id in (p if isinstance(p, str) else p.decode(errors="replace")) for p in payloads)


@pytest.mark.parametrize("db, broker, blobs", COMBINATIONS, ids=IDS)
def test_smoke_flow(start_service, distributed_backends, db, broker, blobs):
    t0 = time.monotonic()
    env = distributed_backends.env(db=db, broker=broker, blobs=blobs)
    assert {"DATABASE_URL" in env, "REDIS_URL" in env, "S3_BUCKET" in env} == {True, False}
    svc = start_service("embedded", env=env, worker=True)
    t_up = time.monotonic() - t0
    where = Backends(svc, env)
    checks = svc.client().get("/readyz").json()["checks"]
    assert checks["database"] == checks["broker"] == checks["storage"] == "ok", checks
    t = svc.make_tenant()
    c = t.client
    base = _until(lambda: [m["id"] for m in c.get("/v1/models").json()["data"] if not m["id"].startswith("ft:")],
                  "the base model")[0]

    # 1. upload: validated, byte-identical through the API and in the blob backend
    r = c.post("/v1/files", files={"file": ("train.jsonl", TRAIN, "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    def validated():
        f = c.get(f"/v1/files/{fid}").json()
        return f if f["status"] != "uploaded" else None
    f = _until(validated, "file validation")
    assert f["status"] == "processed" and f["row_count"] == 60, f
    assert c.get(f"/v1/files/{fid}/content").content == TRAIN
    key = f"files/{t.id}/{fid}"
    assert where.blob(key) == TRAIN
    assert where.local_blob_exists(key) is not blobs  # S3 combinations leave the local directory alone

    # 2. a tiny prefix job runs on the worker and succeeds
    r = c.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": fid, "suffix": "smoke", "method": METHOD})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    def finished():
        j = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return j if j["status"] in ("succeeded", "failed", "cancelled") else None
    job = _until(finished, "the job", timeout=120)
    assert job["status"] == "succeeded", (job, svc.workers[0].log())
    ft = job["fine_tuned_model"]
    assert ft == f"ft:{base}:{t.id}:smoke:{job_id}" and job["hyperparameters"]["n_epochs"] == 1
    (rf,) = job["result_files"]
    r = c.get(f"/v1/files/{rf}/content")
    assert r.status_code == 200
    assert [row["model"] for row in csv.DictReader(io.StringIO(r.text))] == [base, ft]
    assert where.blob(f"adapters/{t.id}/{job_id}/adapter.zip")  # the worker wrote the adapter there
    assert where.job_row(job_id) == ("succeeded", ft)
    assert (svc.data_dir / "prefixd.db").exists() is not db
    assert where.broker_trace(job_id)
    assert (svc.data_dir / "broker.db").exists() is not broker

    # 3. the adapter serves a completion and exports as a PEFT zip
    r = c.post("/v1/completions", json={"model": ft, "prompt": "item 99 is blue ->", "max_tokens": 3,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert body["model"] == ft and len(body["choices"]) == 1
    assert usage["prompt_tokens"] > 0 and 0 <= usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    ex = c.get(f"/v1/models/{ft}/export")
    assert ex.status_code == 200 and ex.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(ex.content)) as zf:
        assert json.loads(zf.read("adapter_config.json"))["num_virtual_tokens"] == 4

    # 4. the training file (its job finished) can be deleted, blob and all
    r = c.delete(f"/v1/files/{fid}")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert c.get(f"/v1/files/{fid}").status_code == 404
    assert where.blob(key) is None
    print(f"\n{IDS[COMBINATIONS.index((db, broker, blobs))]}: up in {t_up:.1f} s, "
          f"flow in {time.monotonic() - t0 - t_up:.1f} s")
