"""Issue 13, section 3: the conformance gaps that the official client hits, on a real server (the
shared embedded service, no worker: jobs stay queued, which is all the list filter needs)."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration

BASE = "gpt2"


@pytest.fixture(scope="module")
def svc(embedded_service):
    embedded_service.wait_ready()
    return embedded_service


def upload(client, text: str, purpose: str = "fine-tune") -> str:
    r = client.post("/v1/files", files={"file": ("data.jsonl", text.encode(), "application/jsonl")},
                    data={"purpose": purpose})
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/files/{fid}").json()["status"] == "uploaded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return fid


def rows(n: int) -> str:
    return "".join(json.dumps({"prompt": f"item {i} ->", "completion": " warm"}) + "\n" for i in range(n))


def test_jobs_list_metadata_filter_official_client(svc):
    t = svc.make_tenant()
    fid = upload(t.client, rows(8))
    client = svc.openai(t.key)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
    a = client.fine_tuning.jobs.create(model=BASE, training_file=fid, method=method, metadata={"team": "x"})
    b = client.fine_tuning.jobs.create(model=BASE, training_file=fid, method=method,
                                       metadata={"team": "y", "env": "prod"})
    c = client.fine_tuning.jobs.create(model=BASE, training_file=fid, method=method)
    assert {j.id for j in client.fine_tuning.jobs.list().data} == {a.id, b.id, c.id}
    # the client sends metadata[team]=x
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "x"}).data] == [a.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "y", "env": "prod"}).data] == [b.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "y", "env": "dev"}).data == []
    # the filter is applied before the page is cut, so has_more stays true to the filter
    page = client.fine_tuning.jobs.list(metadata={"team": "x"}, limit=1)
    assert [j.id for j in page.data] == [a.id] and page.has_more is False
    r = t.client.get("/v1/fine_tuning/jobs", params={"metadata": "team"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
