"""Fine-tuning jobs over HTTP: a real uvicorn process and a real Celery worker process (F's harness).

One service with one worker for the module (SQLite, the sqla+sqlite broker, local blobs); short
heartbeat and stale timeouts so the dead-worker test runs in seconds."""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import pytest

from tests.integration.conftest import launch

pytestmark = pytest.mark.integration

JOB_ENV = {"JOB_HEARTBEAT_S": "0.5", "JOB_STALE_AFTER_S": "4", "JOB_MONITOR_INTERVAL_S": "0.5",
           "MAX_RUNNING_JOBS_PER_TENANT": "4"}


def rows(n: int) -> str:
    words = {"red": " warm", "orange": " warm", "yellow": " warm", "blue": " cold", "green": " cold",
             "purple": " cold"}
    keys = list(words)
    return "".join(json.dumps({"prompt": f"item {i} is {keys[i % 6]} ->", "completion": words[keys[i % 6]]}) + "\n"
                   for i in range(n))


def small(**hp) -> dict:
    return {"type": "prefix", "prefix": {"num_virtual_tokens": 4,
                                         "hyperparameters": {"n_epochs": 1, "batch_size": 16, **hp}}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_base_dirs):
    s = launch(tmp_path_factory.mktemp("jobs"), "embedded", tiny_base_dirs["gpt2"], None, JOB_ENV, worker=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def base_id(svc) -> str:
    t = svc.make_tenant()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ids = [m["id"] for m in t.client.get("/v1/models").json().get("data", []) if not m["id"].startswith("ft:")]
        if ids:
            return ids[0]
        time.sleep(0.5)
    raise AssertionError("no base model listed")


def upload(client: httpx.Client, text: str, purpose: str = "fine-tune", wait: bool = True) -> str:
    r = client.post("/v1/files", files={"file": ("data.jsonl", text.encode(), "application/jsonl")},
                    data={"purpose": purpose})
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    deadline = time.monotonic() + 30
    while wait and client.get(f"/v1/files/{fid}").json()["status"] == "uploaded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return fid


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if job["status"] in ("failed", "cancelled", "succeeded"):
            break
        time.sleep(0.25)
    raise AssertionError(f"job never reached {statuses}: {job}")


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


def test_prefix_job_succeeds_with_events_checkpoints_results(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(60))
    r = t.client.post("/v1/fine_tuning/jobs", json={"model": base_id, "training_file": fid, "suffix": "colors",
                                                    "metadata": {"team": "qa"}, "method": small(n_epochs=2)})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] in ("queued", "running", "validating_files")
    assert job["error"] is None and job["metadata"] == {"team": "qa"} and job["organization_id"] == t.id
    job = wait_status(t.client, job["id"], {"succeeded"})
    assert job["fine_tuned_model"] == f"ft:{base_id}:{t.id}:colors:{job['id']}"
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    assert job["hyperparameters"]["n_epochs"] == 2

    # the adapter is a model of this tenant
    models = [m["id"] for m in t.client.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models

    # events: newest first, cursor pagination
    ev = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()
    assert ev["object"] == "list" and not ev["has_more"]
    events = ev["data"]
    assert events[0]["message"] == "The job has successfully completed"
    metrics = [e for e in events if e["type"] == "metrics"]
    assert metrics and {"step", "train_loss", "valid_loss", "tokens_per_s"} <= set(metrics[0]["data"])
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    p1 = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 2}).json()
    p2 = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                      params={"limit": 2, "after": p1["data"][-1]["id"]}).json()
    assert p1["has_more"] and [e["id"] for e in p1["data"] + p2["data"]] == [e["id"] for e in events[:4]]

    cks = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 100}).json()["data"]
    assert cks and cks[0]["object"] == "fine_tuning.job.checkpoint" and cks[0]["fine_tuning_job_id"] == job["id"]
    steps = [c["step_number"] for c in cks]
    assert steps == sorted(steps, reverse=True) and cks[0]["metrics"]["step"] == steps[0]
    c1 = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 1}).json()
    assert c1["data"][0]["id"] == cks[0]["id"] and c1["has_more"] == (len(cks) > 1)

    # base vs adapter metrics on the held-out split, as a CSV file
    (rf,) = job["result_files"]
    content = t.client.get(f"/v1/files/{rf}/content")
    assert content.status_code == 200
    table = list(csv.DictReader(io.StringIO(content.text)))
    assert [row["model"] for row in table] == [base_id, job["fine_tuned_model"]]
    assert {"loss", "exact_match", "bleu"} <= set(table[0])

    # the list shows it; another tenant sees nothing of it
    listed = t.client.get("/v1/fine_tuning/jobs", params={"limit": 10}).json()
    assert listed["data"][0]["id"] == job["id"]
    other = svc.make_tenant().client
    for path in ("", "/events", "/checkpoints"):
        err(other.get(f"/v1/fine_tuning/jobs/{job['id']}{path}"), 404)
    err(other.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 404)
    assert other.get("/v1/fine_tuning/jobs").json()["data"] == []
    # a finished job cannot be cancelled
    err(t.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 400)


def test_cancel_running_job(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(200))
    job = t.client.post("/v1/fine_tuning/jobs", json={
        "model": base_id, "training_file": fid, "method": small(n_epochs=100, batch_size=2)}).json()
    wait_status(t.client, job["id"], {"running"}, timeout=120)
    deadline = time.monotonic() + 60
    while not any(e["type"] == "metrics" for e in
                  t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = t.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("running", "cancelled")
    asked = time.monotonic()
    done = wait_status(t.client, job["id"], {"cancelled"}, timeout=30)
    assert time.monotonic() - asked < 15
    assert done["fine_tuned_model"] is None


def test_queued_job_cancels_at_once(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(20), wait=False)
    job = t.client.post("/v1/fine_tuning/jobs", json={"model": base_id, "training_file": fid,
                                                      "method": small()}).json()
    r = t.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    # validating/queued: at once; if the worker was quicker, within seconds
    if r["status"] != "cancelled":
        wait_status(t.client, job["id"], {"cancelled"}, timeout=30)


def test_bad_inputs_name_the_parameter(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(20))
    corpus = upload(t.client, "Some text for a base.\n", purpose="base-train")
    other_file = upload(svc.make_tenant().client, rows(20))
    ok = {"model": base_id, "training_file": fid}
    post = lambda body: t.client.post("/v1/fine_tuning/jobs", json=body)  # noqa: E731
    cases = [
        ({**ok, "method": {"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": 101}}}}, 400,
         "method.prefix.hyperparameters.n_epochs"),
        ({**ok, "method": {"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": "lots"}}}}, 400,
         "method.prefix.hyperparameters.n_epochs"),
        ({**ok, "method": {"type": "prefix", "prefix": {"num_virtual_tokens": 100000}}}, 400,
         "method.prefix.num_virtual_tokens"),
        ({**ok, "method": {"type": "prefix", "prefix": {"colour": "red"}}}, 400, "method.prefix.colour"),
        ({**ok, "method": {"type": "prefix", "prefix": {"init": "adapter", "init_adapter": "ft:nope"}}}, 404,
         "method.prefix.init_adapter"),
        ({**ok, "suffix": "Not OK!"}, 400, "suffix"),
        ({**ok, "surprise": 1}, 400, "surprise"),
        ({**ok, "model": "no-such-model"}, 404, "model"),
        ({**ok, "training_file": other_file}, 404, "training_file"),
        ({**ok, "training_file": corpus}, 400, "training_file"),
        ({"training_file": fid}, 400, "model"),
    ]
    for body, status, param in cases:
        e = err(post(body), status)
        assert e["param"] == param, (body, e)
    assert err(t.client.post("/v1/fine_tuning/jobs", content=b"{not json",
                             headers={"content-type": "application/json"}), 400)
    assert err(t.client.post("/v1/fine_tuning/jobs", json=[1, 2]), 400)["param"] is None
    assert err(t.client.get("/v1/fine_tuning/jobs", params={"limit": 101}), 400)["param"] == "limit"
    assert err(t.client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404)
    assert err(t.client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}), 400)["param"] == "after"


def test_invalid_file_fails_job(svc, base_id):
    t = svc.make_tenant()
    bad = upload(t.client, rows(5) + "this is not json\n", wait=False)
    r = t.client.post("/v1/fine_tuning/jobs", json={"model": base_id, "training_file": bad})
    if r.status_code == 400:  # validation finished first
        assert r.json()["error"]["param"] == "training_file"
        return
    job = wait_status(t.client, r.json()["id"], {"failed"}, timeout=30)
    assert job["error"]["code"] == "invalid_training_file"


def test_openai_client_lists_and_retrieves(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(20))
    client = svc.openai(t.key)
    job = client.fine_tuning.jobs.create(model=base_id, training_file=fid,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 1, "batch_size": 16}}})
    assert job.id.startswith("ftjob-") and job.method.type == "prefix"
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5).data] == [job.id]
    assert client.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "running", "succeeded")


def test_dead_worker_job_resumes_on_next_worker(svc, base_id):
    t = svc.make_tenant()
    fid = upload(t.client, rows(40))
    job = t.client.post("/v1/fine_tuning/jobs", json={
        "model": base_id, "training_file": fid, "method": small(n_epochs=10, batch_size=4)}).json()
    deadline = time.monotonic() + 120
    while not t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]:
        assert time.monotonic() < deadline, t.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        time.sleep(0.2)
    worker = next(w for w in svc.workers if w.alive())
    worker.kill()  # SIGKILL mid-training
    svc.start_worker()
    done = wait_status(t.client, job["id"], {"succeeded"}, timeout=180)
    msgs = [e["message"] for e in t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                               params={"limit": 100}).json()["data"]]
    assert any("requeued" in m for m in msgs) and any(m.startswith("Resuming from checkpoint") for m in msgs)
    assert done["fine_tuned_model"]


def test_dead_worker_base_job_resumes_on_next_worker(svc, base_id):
    """A base job (tiny preset from scratch) whose worker is SIGKILLed after its first checkpoint
    continues from that checkpoint on a fresh worker instead of starting over."""
    import random

    rng = random.Random(0)
    words = "the a fox dog river bank red blue green jumps over lazy near quick slow cat tree house".split()
    corpus = "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12)) + f" number {i}."}) + "\n"
                     for i in range(600))
    t = svc.make_tenant()
    fid = upload(t.client, corpus, purpose="base-train")
    # ~740 steps of 4 x 64 tokens: a few seconds, with ~10 checkpoints along the way
    job = t.client.post("/v1/fine_tuning/jobs", json={
        "model": "scratch", "training_file": fid, "suffix": "resumed", "method": {"type": "base", "base": {
            "size": "tiny", "hyperparameters": {"n_epochs": 20, "batch_size": 4}}}})
    assert job.status_code == 200, job.text
    job = job.json()
    deadline = time.monotonic() + 120
    while not (ckpts := t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]):
        assert time.monotonic() < deadline, t.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        time.sleep(0.1)
    next(w for w in svc.workers if w.alive()).kill()  # SIGKILL mid-training
    killed_at = max(c["step_number"] for c in ckpts)
    svc.start_worker()
    done = wait_status(t.client, job["id"], {"succeeded"}, timeout=180)
    events = t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    msgs = [e["message"] for e in events]
    assert any("requeued" in m for m in msgs)
    resumed = [m for m in msgs if m.startswith("Resuming from checkpoint step-")]
    assert resumed and int(resumed[0].rsplit("-", 1)[1]) >= killed_at
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps.count(1) == 1  # the second worker did not start from step 1
    assert done["fine_tuned_model"].startswith("resumed-")
    assert done["fine_tuned_model"] in [m["id"] for m in t.client.get("/v1/models").json()["data"]]
    assert t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]


def test_distributed_prefix_job(start_service):
    """PostgreSQL + Redis broker + S3 (moto): a job runs, checkpoints go through S3, results land."""
    svc = start_service("distributed", env=JOB_ENV, worker=True)
    t = svc.make_tenant()
    deadline = time.monotonic() + 120
    base = None
    while base is None:
        assert time.monotonic() < deadline
        ids = [m["id"] for m in t.client.get("/v1/models").json().get("data", []) if not m["id"].startswith("ft:")]
        base = ids[0] if ids else time.sleep(0.5)
    fid = upload(t.client, rows(60))
    job = t.client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": fid,
                                                      "method": small()}).json()
    job = wait_status(t.client, job["id"], {"succeeded"}, timeout=180)
    assert job["fine_tuned_model"] and job["result_files"]
    assert t.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert t.client.get(f"/v1/files/{job['result_files'][0]}/content").status_code == 200
