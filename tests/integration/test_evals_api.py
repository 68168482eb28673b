"""OpenAI's Evals API over HTTP, driven by the official `openai` client (issue 13, section 1).

The flow runs on a real API and Celery worker serving `learnable` (tests/conftest.py), with an
adapter trained in seconds on the word -> label task of tests/integration/test_learning_flow.py:
1. evals.create / retrieve / update / list;
2. runs.create of the adapter on an uploaded eval file (file_id) runs on the worker to
   `completed`; the adapter beats its base on a string_check criterion, the base graded in the
   same run (`base_per_testing_criteria_results`), and `per_testing_criteria_results` has one
   entry per criterion;
3. output_items.list paginates (limit, after, has_more, first_id/last_id), output_items.retrieve;
4. a chat-template run (inline file_content) on the base, which has no chat template, gives what
   /v1/chat/completions gives for the same messages;
5. runs.cancel and runs.delete, evals.delete.

Bad input (a shared server, no worker needed: nothing is created): an unknown criterion type, a
template naming a missing field, a row not matching item_schema (with its line number), another
tenant's model or file.
"""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.integration.test_isolation import peft_zip
from tests.integration.test_learning_flow import LABELS, PLACES, UNSEEN_PLACES, prompt

pytestmark = pytest.mark.integration

# a smaller version of the learning flow's task: enough for the prefix to learn it in seconds
TRAIN = [(prompt(n, p), LABELS[n]) for n in LABELS for p in PLACES[:12]]
TRAIN_JSONL = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in TRAIN).encode()
ITEMS = [{"prompt": prompt(n, p), "label": LABELS[n].strip()} for n in LABELS for p in UNSEEN_PLACES[:2]]  # 24
EVAL_JSONL = "".join(json.dumps({"item": it}) + "\n" for it in ITEMS).encode()

ITEM_SCHEMA = {"type": "object", "properties": {"prompt": {"type": "string"}, "label": {"type": "string"}},
               "required": ["prompt", "label"]}
CRITERIA = [
    {"type": "string_check", "name": "label in answer", "input": "{{sample.output_text}}",
     "reference": "{{item.label}}", "operation": "ilike"},
    {"type": "label", "name": "by probability", "labels": [" food", " city", " dog", " fox"],
     "reference": "{{item.label}}"},
]


def wait_run(client, eval_id: str, run_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
    while run.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
    return run


def train_adapter(client, base: str) -> str:
    f = client.files.create(file=("task.jsonl", io.BytesIO(TRAIN_JSONL), "application/jsonl"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="evals", seed=0,
                                         method={"type": "prefix", "prefix": {"hyperparameters": {"n_epochs": 30}}})
    deadline = time.monotonic() + 120
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    return job.fine_tuned_model


def test_evals_flow_with_the_official_client(start_service, learnable_base_dir):
    svc = start_service(worker=True, base_model=learnable_base_dir)
    t = svc.make_tenant()
    client = svc.openai(t.key)
    base = "learnable"
    t0 = time.monotonic()
    adapter = train_adapter(client, base)
    print(f"\nadapter trained in {time.monotonic() - t0:.1f} s")

    # 1. evals
    ev = client.evals.create(name="nouns", metadata={"team": "x"}, testing_criteria=CRITERIA,
                             data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA,
                                                 "include_sample_schema": True})
    assert ev.id.startswith("eval_") and ev.object == "eval" and ev.metadata == {"team": "x"}
    assert ev.data_source_config.type == "custom"
    assert set(ev.data_source_config.schema_["properties"]) == {"item", "sample"}
    assert [c.name for c in ev.testing_criteria] == ["label in answer", "by probability"]
    assert client.evals.retrieve(ev.id).name == "nouns"
    assert client.evals.update(ev.id, name="nouns v2").name == "nouns v2"
    other = client.evals.create(name="second", testing_criteria=CRITERIA[:1],
                                data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA,
                                                    "include_sample_schema": True})
    listed = client.evals.list(order="asc", limit=1)
    assert [e.id for e in listed.data] == [ev.id] and listed.has_more
    assert [e.id for e in client.evals.list(order="asc", after=ev.id).data] == [other.id]

    # 2. a run of the adapter over an uploaded eval file
    f = client.files.create(file=("items.jsonl", io.BytesIO(EVAL_JSONL), "application/jsonl"), purpose="evals")
    data_source = {"type": "completions", "model": adapter, "source": {"type": "file_id", "id": f.id},
                   "input_messages": {"type": "template", "template": "{{item.prompt}}"},
                   "sampling_params": {"temperature": 0, "max_completion_tokens": 4}}
    t0 = time.monotonic()
    run = client.evals.runs.create(ev.id, name="adapter", data_source=data_source)
    assert run.status in ("queued", "in_progress") and run.model == adapter
    run = wait_run(client, ev.id, run.id)
    print(f"run of {len(ITEMS)} items (adapter + base) in {time.monotonic() - t0:.1f} s")
    assert run.status == "completed", run.error
    assert run.result_counts.total == len(ITEMS) and run.result_counts.errored == 0
    per = {r.testing_criteria: r for r in run.per_testing_criteria_results}
    assert list(per) == ["label in answer", "by probability"]  # one entry per criterion
    extra = run.model_extra
    assert extra["base_model"] == base
    base_per = {r["testing_criteria"]: r for r in extra["base_per_testing_criteria_results"]}
    assert list(base_per) == list(per)
    adapter_pass, base_pass = per["label in answer"].passed, base_per["label in answer"]["passed"]
    print(f"string_check passed: adapter {adapter_pass}/{len(ITEMS)}, base {base_pass}/{len(ITEMS)}; label passed: "
          f"adapter {per['by probability'].passed}, base {base_per['by probability']['passed']}")
    assert adapter_pass >= 0.75 * len(ITEMS) and adapter_pass > base_pass
    metrics = {m["testing_criteria"]: m for m in extra["per_testing_criteria_metrics"]}
    assert metrics["by probability"]["accuracy"] == per["by probability"].passed / len(ITEMS)
    assert {u.model_name for u in run.per_model_usage} == {adapter, base}

    # 3. output items paginate
    first = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=10)
    assert len(first.data) == 10 and first.has_more and first.first_id == first.data[0].id
    seen = [it.id for it in client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=10)]  # auto-paging
    assert len(seen) == len(set(seen)) == len(ITEMS)
    items = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
    assert [it.datasource_item_id for it in items] == list(range(1, len(ITEMS) + 1))  # line numbers
    desc = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100, order="desc").data
    assert [it.id for it in desc] == [it.id for it in reversed(items)]
    passed = client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="pass", limit=100).data
    assert all(it.status == "pass" for it in passed) and len(passed) > 0
    one = client.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
    assert one.datasource_item == ITEMS[0] and one.sample.model == adapter
    assert one.sample.input[0].content == ITEMS[0]["prompt"] and one.results[0].name == "label in answer"
    assert one.model_extra["base_sample"]["model"] == base

    # 4. a chat run on the base (no chat template: /v1/chat/completions' fallback), inline content
    messages = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "{{item.prompt}}"}]
    chat = client.evals.runs.create(other.id, data_source={
        "type": "completions", "model": base,
        "source": {"type": "file_content", "content": [{"item": it} for it in ITEMS[:3]]},
        "input_messages": {"type": "template", "template": messages},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 3}})
    chat = wait_run(client, other.id, chat.id)
    assert chat.status == "completed", chat.error
    assert "base_per_testing_criteria_results" not in chat.model_extra  # a base run grades one model
    got = [it.sample.output[0].content for it in client.evals.runs.output_items.list(chat.id, eval_id=other.id)]
    want = [client.chat.completions.create(
        model=base, temperature=0, max_completion_tokens=3,
        messages=[messages[0], {"role": "user", "content": it["prompt"]}]).choices[0].message.content
        for it in ITEMS[:3]]
    assert got == want

    # 5. cancel, delete
    queued = client.evals.runs.create(ev.id, data_source={**data_source, "source": {
        "type": "file_content", "content": [{"item": it} for it in ITEMS * 4]}})
    canceled = client.evals.runs.cancel(queued.id, eval_id=ev.id)
    assert canceled.status == "canceled"
    time.sleep(1)
    assert client.evals.runs.retrieve(queued.id, eval_id=ev.id).status == "canceled"
    runs = client.evals.runs.list(ev.id, limit=10)
    assert [r.id for r in runs.data] == [run.id, queued.id] and not runs.has_more
    assert [r.id for r in client.evals.runs.list(ev.id, status="canceled").data] == [queued.id]
    assert client.evals.runs.delete(queued.id, eval_id=ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(queued.id, eval_id=ev.id)
    assert client.evals.delete(other.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(chat.id, eval_id=other.id)


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def tenant(embedded_service):
    embedded_service.wait_ready()
    return embedded_service.make_tenant()


def _eval(client, **kw) -> dict:
    body = {"name": "bad", "testing_criteria": CRITERIA[:1],
            "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}}
    r = client.post("/v1/evals", json={**body, **kw})
    return r


def _served_base(client) -> str:
    return next(m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] == "base" and m["served"])


def _error(r, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] and err["message"], err
    return err


def test_bad_evals_are_refused_and_nothing_is_created(tenant):
    c = tenant.client
    r = _eval(c, testing_criteria=[{"type": "regex_check", "name": "x", "input": "a", "reference": "b"}])
    assert "unknown criterion type" in _error(r, 400, "testing_criteria[0].type")["message"]
    r = _eval(c, testing_criteria=[{"type": "python", "name": "x", "source": "def grade(s, i): return 1"}])
    _error(r, 400, "testing_criteria[0].type")
    r = _eval(c, testing_criteria=[{**CRITERIA[0], "reference": "{{item.lable}}"}])
    _error(r, 400, "testing_criteria[0].reference")
    assert c.get("/v1/evals").json()["data"] == []


def test_bad_runs_are_refused_and_nothing_is_created(tenant, embedded_service, tiny_base_dirs):
    c = tenant.client
    ev = _eval(c).json()
    base = _served_base(c)
    ds = {"type": "completions", "model": base, "input_messages": {"type": "template", "template": "{{item.prompt}}"},
          "source": {"type": "file_content", "content": [{"item": it} for it in ITEMS[:3]]}}

    def create(**over):
        return c.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": {**ds, **over}})

    r = create(input_messages={"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]})
    _error(r, 400, "data_source.input_messages.template[0].content")
    rows = [{"item": ITEMS[0]}, {"item": {"prompt": "x"}}, {"item": {"prompt": 3, "label": "food"}}]
    err = _error(create(source={"type": "file_content", "content": rows}), 400, "data_source.source")
    assert "line 2" in err["message"] and "line 3" in err["message"] and "line 1:" not in err["message"]
    bad_file = (json.dumps({"item": ITEMS[0]}) + "\n" + json.dumps({"item": {"label": "food"}}) + "\n").encode()
    f = c.post("/v1/files", files={"file": ("e.jsonl", bad_file, "application/jsonl")}, data={"purpose": "evals"})
    assert f.status_code == 200, f.text
    err = _error(create(source={"type": "file_id", "id": f.json()["id"]}), 400, "data_source.source")
    assert "line 2" in err["message"] and "'prompt' is a required property" in err["message"]
    _error(create(sampling_params={"temperature": 5}), 400, "data_source.sampling_params.temperature")

    # another tenant's adapter and file do not exist for this one
    other = embedded_service.make_tenant()
    r = other.client.post("/v1/models/import", files={"file": ("a.zip", peft_zip(tiny_base_dirs["gpt2"], 4, 5),
                                                                "application/zip")})
    assert r.status_code == 201, r.text
    _error(create(model=r.json()["id"]), 404, "data_source.model")
    theirs = other.client.post("/v1/files", files={"file": ("e.jsonl", EVAL_JSONL, "application/jsonl")},
                               data={"purpose": "evals"}).json()
    _error(create(source={"type": "file_id", "id": theirs["id"]}), 404, "data_source.source.id")
    _error(c.get(f"/v1/evals/{ev['id']}", headers={"Authorization": f"Bearer {other.key}"}), 404, "eval_id")

    assert c.get(f"/v1/evals/{ev['id']}/runs").json()["data"] == []
    assert create().status_code == 200  # the same run, well formed, is accepted
