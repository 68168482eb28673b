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


def test_files_list_first_and_last_id(svc):
    t = svc.make_tenant()
    ids = [upload(t.client, rows(2)) for _ in range(2)]
    page = t.client.get("/v1/files").json()
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
    assert {page["first_id"], page["last_id"]} == set(ids)


def test_system_fingerprint_on_chat_and_stream_chunks(svc):
    t = svc.make_tenant()
    client = svc.openai(t.key)
    fp = client.completions.create(model=BASE, prompt="hello", max_tokens=2, temperature=0).system_fingerprint
    assert fp
    msgs = [{"role": "user", "content": "hello"}]
    assert client.chat.completions.create(model=BASE, messages=msgs, max_tokens=2).system_fingerprint == fp
    chunks = list(client.chat.completions.create(model=BASE, messages=msgs, max_tokens=3, stream=True))
    assert chunks and all(c.system_fingerprint == fp for c in chunks)
    chunks = list(client.completions.create(model=BASE, prompt="hello", max_tokens=3, stream=True))
    assert chunks and all(c.system_fingerprint == fp for c in chunks)


def test_chat_stream_stopped_at_once_has_empty_content(svc):
    """A stop string that ends the stream at once: the first chunk still carries role and
    content "" as OpenAI's does, so the client's stream helper returns content "" (not None)."""
    t = svc.make_tenant()
    client = svc.openai(t.key)
    msgs = [{"role": "user", "content": "hello"}]
    first = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=1, temperature=0).choices[0]
    stop = first.message.content
    assert stop
    with client.chat.completions.stream(model=BASE, messages=msgs, max_tokens=4, temperature=0,
                                        stop=[stop]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == ""
