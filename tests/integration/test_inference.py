"""Inference over HTTP against a real uvicorn process (BASE_MODEL = the tiny GPT-2 test base):
models, completions, chat, streaming, classify, adapter import/export/delete, tenant isolation,
the error cases, the official `openai` client, base switching, the queue bound and disconnects."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import httpx
import pytest
import torch

from tests.integration.sse import sse_events

pytestmark = pytest.mark.integration

BASE = "gpt2"  # slug of the tiny GPT-2 dir the harness serves


def peft_zip(geometry, P: int, seed: int, scale: float = 1.0) -> bytes:
    from app.ml.adapter import Adapter, export_peft_zip
    from app.ml.prefix import PrefixConfig

    cfg = PrefixConfig(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, num_virtual_tokens=P)
    table = torch.randn(P, cfg.table_width, generator=torch.Generator().manual_seed(seed)) * scale
    return export_peft_zip(Adapter.from_table(table, cfg, "set-by-import"))


def geometry_of(path):
    from transformers import AutoConfig

    from app.ml.kvcache import ModelGeometry

    return ModelGeometry.of(AutoConfig.from_pretrained(path, local_files_only=True))


def import_adapter(client, zip_bytes: bytes, suffix: str | None = None):
    data = {"suffix": suffix} if suffix else {}
    return client.post("/v1/models/import", files={"file": ("adapter.zip", zip_bytes, "application/zip")}, data=data)


def complete(client, model, prompt="name: Aromi | food:", **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return client.post("/v1/completions", json=body)


@pytest.fixture(scope="module")
def svc(embedded_service):
    embedded_service.wait_ready()
    return embedded_service


@pytest.fixture(scope="module")
def tenant(svc):
    return svc.make_tenant()


@pytest.fixture(scope="module")
def adapter_id(svc, tenant, tiny_base_dirs):
    r = import_adapter(tenant.client, peft_zip(geometry_of(tiny_base_dirs["gpt2"]), 6, seed=1), "demo")
    assert r.status_code == 201, r.text
    return r.json()["id"]


# ---------------------------------------------------------------------------------- base


def test_models_list_and_get(svc, tenant, adapter_id):
    data = tenant.client.get("/v1/models").json()
    assert data["object"] == "list"
    ids = {m["id"]: m for m in data["data"]}
    assert ids[BASE]["kind"] == "base" and ids[BASE]["served"] and ids[BASE]["owned_by"] == "system"
    assert ids[adapter_id]["kind"] == "adapter" and ids[adapter_id]["base"] == BASE
    assert adapter_id.startswith(f"ft:{BASE}:{tenant.id}:demo:")
    m = tenant.client.get(f"/v1/models/{adapter_id}").json()
    assert m["object"] == "model" and m["num_virtual_tokens"] == 6
    assert tenant.client.get(f"/v1/models/{BASE}").json()["id"] == BASE


def test_completion_on_base(svc, tenant):
    r = complete(tenant.client, BASE)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-request-id")
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == BASE
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert complete(tenant.client, BASE).json()["choices"][0]["text"] == choice["text"]  # greedy: reproducible


def test_completion_params(svc, tenant):
    r = complete(tenant.client, BASE, n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2, stop=["zzz", "\n\n"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    again = complete(tenant.client, BASE, n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]  # seeded
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    # a batch of prompts: choices in prompt order
    r = tenant.client.post("/v1/completions", json={"model": BASE, "prompt": ["a", "b"], "max_tokens": 2, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    # stop string: the text never contains it
    text = complete(tenant.client, BASE, max_tokens=30).json()["choices"][0]["text"]
    if len(text) > 4:
        stop = text[2:4]
        cut = complete(tenant.client, BASE, max_tokens=30, stop=stop).json()["choices"][0]
        assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


def test_chat_completion(svc, tenant):
    r = tenant.client.post("/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0,
        "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert body["usage"]["completion_tokens"] <= 5
    assert body["choices"][0]["logprobs"]["content"]


def test_streaming_matches_non_streaming(svc, tenant):
    full = complete(tenant.client, BASE, max_tokens=12).json()
    r = tenant.client.post("/v1/completions", json={
        "model": BASE, "prompt": "name: Aromi | food:", "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == full["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]

    r = tenant.client.post("/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_classify(svc, tenant, adapter_id):
    for model in (BASE, adapter_id):
        r = tenant.client.post("/v1/classify", json={"model": model, "input": "label:",
                                                     "labels": [" positive", " negative", " neutral"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "classification" and body["model"] == model
        assert [d["label"] for d in body["data"]] == [" positive", " negative", " neutral"]
        assert abs(sum(d["probability"] for d in body["data"]) - 1) < 1e-6
        assert all(d["logprob"] < 0 for d in body["data"]) and body["usage"]["total_tokens"] > 0
    r = tenant.client.post("/v1/classify", json={"model": BASE, "input": "x", "labels": ["a", "a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "labels"


# ---------------------------------------------------------------------------------- adapters


def test_adapter_completion_export_roundtrip_and_delete(svc, tenant, tiny_base_dirs):
    g = geometry_of(tiny_base_dirs["gpt2"])
    r = import_adapter(tenant.client, peft_zip(g, 12, seed=5, scale=3.0), "roundtrip")
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    a = complete(tenant.client, mid, max_tokens=10)
    assert a.status_code == 200, a.text
    assert a.json()["model"] == mid

    ex = tenant.client.get(f"/v1/models/{mid}/export")
    assert ex.status_code == 200 and ex.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(ex.content)).namelist()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads(zipfile.ZipFile(io.BytesIO(ex.content)).read("adapter_config.json"))
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == 12
    again = import_adapter(tenant.client, ex.content, "copy")
    assert again.status_code == 201
    b = complete(tenant.client, again.json()["id"], max_tokens=10)
    assert b.json()["choices"][0]["text"] == a.json()["choices"][0]["text"]

    d = tenant.client.delete(f"/v1/models/{mid}")
    assert d.status_code == 200 and d.json() == {"id": mid, "object": "model", "deleted": True}
    assert tenant.client.get(f"/v1/models/{mid}").status_code == 404
    assert complete(tenant.client, mid).status_code == 404
    assert tenant.client.get(f"/v1/models/{mid}/export").status_code == 404
    assert tenant.client.delete(f"/v1/models/{mid}").status_code == 404


def test_other_tenant_gets_404(svc, tenant, adapter_id):
    other = svc.make_tenant()
    c = other.client
    assert c.get(f"/v1/models/{adapter_id}").status_code == 404
    assert c.get(f"/v1/models/{adapter_id}/export").status_code == 404
    assert c.delete(f"/v1/models/{adapter_id}").status_code == 404
    r = complete(c, adapter_id)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert adapter_id not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert tenant.client.get(f"/v1/models/{adapter_id}").status_code == 200  # unchanged for its owner


def test_import_rejects_bad_input(svc, tenant, tiny_base_dirs):
    c = tenant.client
    r = import_adapter(c, b"not a zip")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    g = geometry_of(tiny_base_dirs["llama"])  # other geometry than the served GPT-2
    r = import_adapter(c, peft_zip(g, 4, 0))
    assert r.status_code == 400 and "does not fit the base" in r.json()["error"]["message"]
    r = import_adapter(c, peft_zip(geometry_of(tiny_base_dirs["gpt2"]), 4, 0), "Bad_Suffix")
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter_config.json", json.dumps({"peft_type": "PREFIX_TUNING"}))
        z.writestr("adapter_model.bin", b"pickle")
    r = import_adapter(c, buf.getvalue())
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": BASE}, 400, "prompt"),
    ({"model": BASE, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),  # in range they are supported
    ({"model": BASE, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": BASE, "prompt": "x", "echo": True, "n": 2}, 400, "echo"),  # echo itself is supported (lm-eval)
    ({"model": BASE, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": BASE, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": BASE, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": BASE, "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": BASE, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": BASE, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": BASE, "prompt": [99999]}, 400, "prompt"),
    ({"model": BASE, "prompt": ["a"] * 200}, 400, "prompt"),
    ({"model": BASE, "prompt": "x", "seed": 2**70}, 400, "seed"),
])
def test_completion_errors(svc, tenant, body, status, param):
    r = tenant.client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_ignored_params_are_accepted(svc, tenant):
    r = complete(tenant.client, BASE, user="someone", presence_penalty=0, logit_bias={}, echo=False, max_tokens=2)
    assert r.status_code == 200, r.text


def test_context_check_counts_the_prefix(svc, tenant, tiny_base_dirs):
    g = geometry_of(tiny_base_dirs["gpt2"])  # 256 positions
    r = import_adapter(tenant.client, peft_zip(g, 40, seed=2), "long")
    mid = r.json()["id"]
    ok = complete(tenant.client, BASE, prompt="hello", max_tokens=240)
    assert ok.status_code == 200, ok.text  # fits without a prefix
    r = complete(tenant.client, mid, prompt="hello", max_tokens=240)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "256" in msg and "40" in msg and "240" in msg and r.json()["error"]["code"] == "context_length_exceeded"
    long_chat = {"model": mid, "messages": [{"role": "user", "content": "x" * 2000}]}
    r = tenant.client.post("/v1/chat/completions", json=long_chat)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client(svc, tenant, adapter_id):
    client = svc.openai(tenant.key)
    ids = [m.id for m in client.models.list()]
    assert BASE in ids and adapter_id in ids
    c = client.completions.create(model=adapter_id, prompt="name: Aromi", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.total_tokens > 0
    stream = client.completions.create(
        model=adapter_id,
        prompt="name: Aromi",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == c.choices[0].text and usage.completion_tokens == c.usage.completion_tokens
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="x", logit_bias={"1": 500})


# ---------------------------------------------------------------------------------- own service


@pytest.fixture(scope="module")
def small_svc(tmp_path_factory, tiny_base_dirs):
    """A service of our own: batch size 1 and a queue of 2, so saturation is easy to reach."""
    from tests.integration.conftest import launch

    s = launch(
        tmp_path_factory.mktemp("inference"),
        "embedded",
        tiny_base_dirs["gpt2"],
        None,
        env={"MAX_BATCH_SIZE": "1", "MAX_QUEUED_REQUESTS": "2", "BATCH_WINDOW_MS": "1"},
    )
    s.wait_ready()
    yield s
    s.stop()


def _metric(svc, name: str) -> float:
    for line in httpx.get(svc.base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_queue_bound_answers_429_with_retry_after(small_svc):
    t = small_svc.make_tenant()
    statuses, headers = [], []

    def one():
        r = complete(t.client, BASE, max_tokens=60)
        statuses.append(r.status_code)
        headers.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert all(h for s, h in zip(statuses, headers, strict=False) if s == 429)


def test_disconnect_frees_the_slot(small_svc):
    t = small_svc.make_tenant()
    prompt = "The quick brown fox"
    full = complete(t.client, BASE, prompt=prompt, max_tokens=200).json()
    if full["choices"][0]["finish_reason"] != "length":
        pytest.skip("the tiny model stopped early on this prompt")
    before = _metric(small_svc, "prefixd_generated_tokens_total")
    # a streaming client that reads one chunk and goes away
    with httpx.Client(base_url=small_svc.base_url, headers={"Authorization": f"Bearer {t.key}"}, timeout=30) as c:
        with c.stream(
            "POST",
            "/v1/completions",
            json={"model": BASE, "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True},
        ) as r:
            for _ in r.iter_lines():
                break
    # a non-streaming client that gives up and goes away. The server notices that when it polls
    # (DISCONNECT_POLL_S, 0.25 s), and the tiny model can finish 200 tokens before that even after
    # the client timed out, so finishing is allowed here (no timing race).
    try:
        httpx.post(
            small_svc.base_url + "/v1/completions",
            headers={"Authorization": f"Bearer {t.key}"},
            json={"model": BASE, "prompt": prompt, "max_tokens": 200, "temperature": 0},
            timeout=0.05,
        )
    except httpx.TimeoutException:
        pass
    time.sleep(1.0)
    # batch size 1: this one runs after the two abandoned ones have left the engine
    assert complete(t.client, BASE, prompt=prompt, max_tokens=2).status_code == 200
    generated = _metric(small_svc, "prefixd_generated_tokens_total") - before
    # without aborts: 2 x 200 + 2; the streaming client left after one chunk, so its row was cut
    # short, whatever the non-streaming one did (at most 200)
    assert generated < 200 + 200, generated


def test_switch_served_base_and_adapter_409(small_svc, tiny_base_dirs):
    from app.config import Settings
    from app.store.base_registry import register_base
    from app.store.blobs import make_blob_store
    from app.store.db import make_engine, make_session_factory

    t = small_svc.make_tenant()
    r = import_adapter(t.client, peft_zip(geometry_of(tiny_base_dirs["gpt2"]), 4, seed=3), "sw")
    mid = r.json()["id"]
    # register a second base the way a base job does (same database and storage as the service)
    settings = Settings(data_dir=small_svc.data_dir)
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        register_base(session, make_blob_store(settings), tiny_base_dirs["llama"], "tiny-llama")
        session.commit()
    engine.dispose()

    r = complete(t.client, "tiny-llama")
    assert r.status_code == 409 and r.headers.get("x-should-retry") == "false"
    assert "not being served" in r.json()["error"]["message"]
    assert t.client.post("/v1/admin/serving", json={"model": "tiny-llama"}).status_code in (401, 403)

    r = small_svc.admin.post("/v1/admin/serving", json={"model": "tiny-llama"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-llama" and r.json()["ready"]
    assert complete(t.client, "tiny-llama").status_code == 200
    r = complete(t.client, mid)
    assert r.status_code == 409 and r.headers.get("x-should-retry") == "false"
    assert r.json()["error"]["code"] == "adapter_base_mismatch"
    assert complete(t.client, BASE).status_code == 409
    assert small_svc.admin.post("/v1/admin/serving", json={"model": mid}).status_code == 400
    assert small_svc.admin.post("/v1/admin/serving", json={"model": "nope"}).status_code == 404

    assert small_svc.admin.post("/v1/admin/serving", json={"model": BASE}).status_code == 200
    assert complete(t.client, mid).status_code == 200
