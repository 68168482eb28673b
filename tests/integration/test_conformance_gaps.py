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


def _released_before(chunks_text: list[str], chunks_lps: list[list[str]]) -> None:
    """Each chunk's logprobs are tokens whose text has begun to be sent by the end of that chunk:
    none arrives before its text (and with the joined logprobs equal to the whole answer's, none
    after the chunk that releases it)."""
    sent_text, sent_tokens = "", ""
    for text, tokens in zip(chunks_text, chunks_lps, strict=False):
        if tokens:
            start_of_last = len(sent_tokens) + len("".join(tokens[:-1]))
            sent_tokens += "".join(tokens)
            sent_text += text
            assert text and len(sent_text) > start_of_last, (sent_text, tokens)
        else:
            sent_text += text


def test_stream_logprobs_arrive_with_their_text_official_client(svc):
    """Completions and chat: each streamed chunk carries the logprobs of the tokens whose text it
    carries, so the chunks' logprobs joined are the non-streamed answer's; a token held back for a
    possible stop string goes with the chunk that releases it."""
    t = svc.make_tenant()
    client = svc.openai(t.key)
    prompt, kw = "name: Aromi | food:", {"max_tokens": 10, "temperature": 0}
    full = client.completions.create(model=BASE, prompt=prompt, logprobs=2, **kw).choices[0].logprobs
    assert len(full.tokens) >= 4
    # hold back a token: a stop string that starts with its text and never completes
    held = next(i for i in range(1, len(full.tokens) - 1) if full.tokens[i].strip() and full.tokens[i + 1])
    for stop in (None, [full.tokens[held] + "\x00"]):
        chunks = [c.choices[0] for c in client.completions.create(model=BASE, prompt=prompt, logprobs=2, stream=True,
                                                                  stop=stop, **kw)]
        lps = [c.logprobs for c in chunks]
        assert sum(1 for lp in lps if lp and lp.tokens) >= 3  # not all in the last chunk
        joined = {k: [x for lp in lps if lp for x in getattr(lp, k)] for k in
                  ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert joined == {k: getattr(full, k) for k in joined}
        _released_before([c.text for c in chunks], [lp.tokens if lp else [] for lp in lps])
        if all(tok.isascii() for tok in full.tokens):
            # each chunk's logprobs are exactly the tokens of its text: with the stop string, a held
            # token goes with the later chunk that releases its text, not with the chunk of its step
            assert all("".join(lp.tokens) == c.text for c, lp in zip(chunks, lps, strict=False) if lp and c.text)

    msgs = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=BASE, messages=msgs, logprobs=True, top_logprobs=2, **kw)
    chunks = [c.choices[0] for c in client.chat.completions.create(model=BASE, messages=msgs, logprobs=True,
                                                                   top_logprobs=2, stream=True, **kw)]
    assert chunks[0].delta.role == "assistant" and chunks[0].delta.content == "" and chunks[0].logprobs is None
    got = [x.model_dump() for c in chunks if c.logprobs for x in c.logprobs.content]
    assert got == [x.model_dump() for x in whole.choices[0].logprobs.content]
    assert sum(1 for c in chunks if c.logprobs and c.logprobs.content) >= 3
    _released_before([c.delta.content or "" for c in chunks],
                     [[x.token for x in c.logprobs.content] if c.logprobs else [] for c in chunks])


def test_processed_file_has_no_null_status_details(svc):
    """OpenAI's spec has status_details an optional string: a file without details leaves it out
    (the official client reads None), an invalid file has its reasons there."""
    t = svc.make_tenant()
    ok = t.client.get(f"/v1/files/{upload(t.client, rows(2))}").json()
    assert ok["status"] == "processed" and "status_details" not in ok
    listed = t.client.get("/v1/files").json()["data"]
    assert listed and all("status_details" not in f for f in listed)
    bad_id = upload(t.client, "not json\n")
    bad = t.client.get(f"/v1/files/{bad_id}").json()
    assert bad["status"] == "error" and isinstance(bad["status_details"], str)
    assert svc.openai(t.key).files.retrieve(ok["id"]).status_details is None


def test_checkpoint_before_first_evaluation_omits_valid_loss(svc):
    """A checkpoint taken before the first evaluation has no valid_loss: the key is left out
    (OpenAI's metrics are numbers), not null. The checkpoint row is written into the service's
    database as the runner records one (app.jobs.state.record_checkpoint)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.jobs import state
    from app.store.tables import Job

    t = svc.make_tenant()
    client = svc.openai(t.key)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(t.client, rows(8)))
    engine = create_engine(f"sqlite:///{svc.data_dir / 'prefixd.db'}")
    try:
        with Session(engine) as s:
            state.record_checkpoint(s, s.get(Job, job.id), 3, {"train_loss": 2.5, "valid_loss": None},
                                    None, f"ft:{BASE}:{t.id}::{job.id}")
            s.commit()
    finally:
        engine.dispose()
    (ck,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ck.metrics.train_loss == 2.5 and ck.metrics.step == 3
    raw = t.client.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"][0]["metrics"]
    assert raw == {"step": 3, "train_loss": 2.5}


def test_penalties_and_logit_bias_over_http(svc):
    """presence_penalty, frequency_penalty and logit_bias work through the official client on both
    routes; out of range they are 400s naming the parameter."""
    import openai

    t = svc.make_tenant()
    client = svc.openai(t.key)
    prompt, kw = "name: Aromi | food:", {"max_tokens": 6, "temperature": 0}
    forced_id = 42
    forced = client.completions.create(model=BASE, prompt=prompt, logit_bias={str(forced_id): 100}, logprobs=0, **kw)
    unbiased = client.completions.create(model=BASE, prompt=prompt, logprobs=0, **kw).choices[0].logprobs.tokens
    assert forced.choices[0].logprobs.tokens == [forced.choices[0].logprobs.tokens[0]] * 6 != unbiased
    # the forced token's logprob is the model's own, not the biased distribution's ~0
    assert forced.choices[0].logprobs.token_logprobs[0] < -1
    plain = client.completions.create(model=BASE, prompt=prompt, **kw).choices[0].text
    assert len(set(plain)) < len(plain)  # the tiny base repeats itself ...
    penalised = client.completions.create(model=BASE, prompt=prompt, frequency_penalty=2, presence_penalty=2, **kw)
    assert penalised.choices[0].text != plain  # ... and the penalties change that
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=BASE, messages=msgs, logit_bias={str(forced_id): 100},
                                          frequency_penalty=0.5, logprobs=True, **kw)
    assert [x.token for x in chat.choices[0].logprobs.content] == [forced.choices[0].logprobs.tokens[0]] * 6
    for bad, param in (
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=BASE, prompt=prompt, **kw, **bad)
        assert e.value.body["param"] == param, (bad, e.value.body)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=msgs, **kw, **bad)
        assert e.value.body["param"] == param, (bad, e.value.body)


def test_documented_extensions_hold_official_client(svc):
    """What docs/EXTENSIONS.md says of jobs and of the client's newer chat fields, on a real server:
    OpenAI's supervised method answers as the prefix job it is, n_epochs may pass the spec's 50,
    and the caching/abuse fields the client sends are accepted."""
    import openai

    t = svc.make_tenant()
    client = svc.openai(t.key)
    fid = upload(t.client, rows(8))
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=fid,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 60}}},
    )
    assert job.method.type == "prefix"
    method = t.client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["method"]
    assert method["prefix"]["hyperparameters"]["n_epochs"] == 60 and "supervised" not in method
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            model=BASE,
            training_file=fid,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 101}}},
        )
    assert e.value.body["param"] == "method.prefix.hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model=BASE, training_file=fid, integrations=[{"type": "wandb", "wandb": {"project": "x"}}]
        )
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        prompt_cache_key="k",
        safety_identifier="u1",
        verbosity="low",
    )
    assert chat.choices[0].message.role == "assistant"
