"""The learning flow over HTTP: a prefix job with the engine's defaults teaches a task, and the
completions of its adapter show it.

Real processes only (the harness of tests/integration/conftest.py): one uvicorn API and one Celery
worker per backend, serving `learnable` (tests/conftest.py: a tiny random Llama with full multi-head
attention and init std 0.1; the default tiny GPT-2 cannot be steered by a prefix, measured 25% exact
match, one label for every prompt). The flow runs twice:
- embedded: SQLite, the sqla+sqlite broker, local blobs; driven with the official `openai` client;
- distributed: PostgreSQL, Redis, S3 (moto); driven with plain HTTP (httpx).

1. a tenant uploads a JSONL task whose label depends on one word of the prompt;
2. a prefix job with `method: {"type": "prefix"}` and no hyperparameters runs until it succeeds;
3. greedy completions of the adapter reach >= 90% exact match on unseen prompts (unseen distractor
   words), where the base alone gets < 60% (measured: 98-100% and 0%);
4. one completion streams (SSE, ends with [DONE], same text), the adapter is exported, imported back
   (same greedy outputs), and both are deleted (404 afterwards).
"""

from __future__ import annotations

import csv
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.sse import sse_events

pytestmark = pytest.mark.integration

# The label depends on the noun only; the place is a distractor.
LABELS = {"pizza": " food", "bread": " food", "soup": " food",
          "coffee": " city", "tea": " city", "milk": " city",
          "pub": " dog", "bar": " dog", "cafe": " dog",
          "jumps": " fox", "runs": " fox", "sits": " fox"}
PLACES = ("kitchen garden market station harbor office river valley forest desert island castle bridge tower "
          "village school library museum theatre stadium airport hotel bakery factory temple").split()
UNSEEN_PLACES = ["attic", "canyon", "meadow", "studio"]  # in no training prompt


def prompt(noun: str, place: str) -> str:
    return f"item {noun} in the {place} ->"


TRAIN = [(prompt(n, p), LABELS[n]) for n in LABELS for p in PLACES]  # 300 pairs
UNSEEN = [(prompt(n, p), LABELS[n]) for n in LABELS for p in UNSEEN_PLACES]  # 48 prompts
assert not {p for p, _ in UNSEEN} & {p for p, _ in TRAIN}
TRAIN_JSONL = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TRAIN).encode()
MAX_TOKENS = 4  # a label is one token; the adapter learned to stop with EOS after it


def exact_match(outputs: list[str]) -> float:
    return sum(o == c for o, (_, c) in zip(outputs, UNSEEN, strict=False)) / len(UNSEEN)


def concurrently(fn, prompts: list[str]) -> list[str]:
    """All prompts at once, so the server batches them."""
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(fn, prompts))


def served_base(client: httpx.Client) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ids = [m["id"] for m in client.get("/v1/models").json().get("data", []) if not m["id"].startswith("ft:")]
        if ids:
            return ids[0]
        time.sleep(0.5)
    raise AssertionError("no base model listed")


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    events, params = [], {"limit": 100}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["after"] = page["data"][-1]["id"]


# ------------------------------------------------------------------------- steps 1-2, two drivers

def train_with_openai(svc, t, base: str) -> tuple[str, object]:
    """files.create, fine_tuning.jobs.create / retrieve through the official client."""
    client = svc.openai(t.key)
    f = client.files.create(file=("task.jsonl", io.BytesIO(TRAIN_JSONL), "application/jsonl"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="nouns", seed=0,
                                         method={"type": "prefix"})
    assert job.id.startswith("ftjob-") and job.method.type == "prefix"
    deadline = time.monotonic() + 240
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{base}:{t.id}:nouns:{job.id}"

    def complete(model: str):
        return lambda p: client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS,
                                                   temperature=0).choices[0].text
    return job.id, (client, complete)


def train_with_httpx(svc, t, base: str) -> tuple[str, object]:
    c = t.client
    r = c.post("/v1/files", files={"file": ("task.jsonl", TRAIN_JSONL, "application/jsonl")},
               data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    r = c.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": r.json()["id"], "suffix": "nouns",
                                             "seed": 0, "method": {"type": "prefix"}})
    assert r.status_code == 200, r.text
    job = r.json()
    deadline = time.monotonic() + 240
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"] == f"ft:{base}:{t.id}:nouns:{job['id']}"

    def complete(model: str):
        def one(p: str) -> str:
            r = c.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": MAX_TOKENS,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        return one
    return job["id"], (None, complete)


# ------------------------------------------------------------------------- the flow

@pytest.mark.parametrize("variant, driver", [("embedded", "openai"), ("distributed", "httpx")])
def test_prefix_job_teaches_the_task(start_service, learnable_base_dir, variant, driver):
    t0 = time.monotonic()
    svc = start_service(variant, worker=True, base_model=learnable_base_dir)
    print(f"\n{variant}: API and worker up in {time.monotonic() - t0:.1f} s")
    t = svc.make_tenant()  # 1. a tenant ...
    base = served_base(t.client)
    assert base == "learnable"

    # 1-2. ... uploads the task; a prefix job with every default runs until it succeeds
    job_id, (oa, complete) = (train_with_openai if driver == "openai" else train_with_httpx)(svc, t, base)
    job = t.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    ft = job["fine_tuned_model"]
    # the engine's defaults (PrefixTrainingConfig), written back into the job; today a direct
    # table of 16 virtual tokens, lr 0.1, batch 8, and for the 270 rows left after the 10%
    # hold-out 30 epochs of 34 steps (n_epochs "auto": about 1000 optimizer steps)
    from app.ml.config import PrefixTrainingConfig

    defaults = PrefixTrainingConfig()
    spec, hp = job["method"]["prefix"], job["hyperparameters"]
    assert spec["prefix_projection"] is defaults.prefix_projection
    assert spec["num_virtual_tokens"] == defaults.num_virtual_tokens
    assert hp["learning_rate"] == pytest.approx(defaults.peak_learning_rate) and hp["batch_size"] == defaults.batch_size
    events = all_events(t.client, job_id)
    (n_train,) = [e["data"]["train_examples"] for e in events if "train_examples" in (e.get("data") or {})]
    assert n_train == 270 and hp["n_epochs"] == defaults.epochs_for(n_train)
    assert ft in [m["id"] for m in t.client.get("/v1/models").json()["data"]]

    # 3. greedy completions of the adapter give what the task taught; the base alone does not
    prompts = [p for p, _ in UNSEEN]
    tuned = concurrently(complete(ft), prompts)
    plain = concurrently(complete(base), prompts)
    em_tuned, em_base = exact_match(tuned), exact_match(plain)
    print(f"\n{variant}/{driver}: job {job['finished_at'] - job['created_at']} s; exact match on "
          f"{len(prompts)} unseen prompts: adapter {em_tuned:.3f}, base {em_base:.3f}")
    assert em_tuned >= 0.9, list(zip(prompts, tuned, strict=False))
    assert em_base < 0.6, list(zip(prompts, plain, strict=False))

    # the job's own held-out evaluation (CSV result file) tells the same story
    (rf,) = job["result_files"]
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(t.client.get(f"/v1/files/{rf}/content").text))}
    print(f"held-out CSV exact match: adapter {rows[ft]['exact_match']}, base {rows[base]['exact_match']}")
    assert float(rows[ft]["exact_match"]) >= 0.8 and float(rows[base]["exact_match"]) < 0.6

    # 4a. streaming (a prompt it got right): the same text as the non-streamed completion, then [DONE]
    i0 = next(i for i, (out, (_, label)) in enumerate(zip(tuned, UNSEEN, strict=False)) if out == label)
    p0 = prompts[i0]
    r = t.client.post("/v1/completions", json={"model": ft, "prompt": p0, "max_tokens": MAX_TOKENS,
                                               "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and len(events) >= 2
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == tuned[i0] == UNSEEN[i0][1]
    if oa is not None:  # and through the official client's stream
        chunks = oa.completions.create(model=ft, prompt=p0, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in chunks) == tuned[i0]

    # 4b. export (PEFT zip), import back: the imported adapter answers exactly the same
    ex = t.client.get(f"/v1/models/{ft}/export")
    assert ex.status_code == 200 and ex.headers["content-type"] == "application/zip"
    r = t.client.post("/v1/models/import", data={"suffix": "reimported"},
                      files={"file": ("adapter.zip", ex.content, "application/zip")})
    assert r.status_code == 201, r.text
    imported = r.json()["id"]
    assert imported.startswith(f"ft:{base}:{t.id}:reimported:") and imported != ft
    assert concurrently(complete(imported), prompts) == tuned

    # 4c. delete both: 404 afterwards
    for mid in (ft, imported):
        if oa is not None:
            d = oa.models.delete(mid)
            assert d.id == mid and d.deleted is True
        else:
            d = t.client.delete(f"/v1/models/{mid}")
            assert d.status_code == 200 and d.json() == {"id": mid, "object": "model", "deleted": True}
        assert t.client.get(f"/v1/models/{mid}").status_code == 404
        r = t.client.post("/v1/completions", json={"model": mid, "prompt": p0, "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert not [m for m in t.client.get("/v1/models").json()["data"] if m["id"].startswith("ft:")]

