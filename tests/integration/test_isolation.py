"""Tenant isolation, proven by walking every operation of the live OpenAPI spec.

Tenant A owns one of each resource: a file, a job (no worker runs on the shared embedded service,
so the job stays `queued` and never trains), an imported PEFT adapter, and the job's events and
checkpoints. Then:

- every tenant operation is called with tenant B's key and A's ids (path parameters, and the
  body/query fields that name a resource): 404, answered exactly as for an id that does not exist
  (so B cannot even learn that A's id exists), and A's state is unchanged afterwards;
- every `/v1/admin/*` operation answers 403 to a tenant key and 401 to no key or a bad key;
- every `/v1/*` operation answers 401 without a key;
- no API key appears in any response body (other than the ones that create it) or in the
  service's log; a revoked key stops working at once.

The walk fails when the spec gains an operation that it does not cover: add a case to CASES.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

PUBLIC_OPS = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
METHODS = ("get", "put", "post", "patch", "delete", "head", "options", "trace")
GOOD_JSONL = "".join(json.dumps({"prompt": f"item {i} ->", "completion": " ok"}) + "\n" for i in range(8))

# a fake id of the same shape for each kind of resource: B must get the same answer for A's id
FAKE = {"file": "file-000000000000000000000000", "job": "ftjob-000000000000000000000000",
        "adapter": "ft:gpt2:tenant-000000000000:x:import-000000000000000000000000",
        "tenant": "tenant-000000000000000000000000", "key": "key-000000000000000000000000",
        "eval": "eval_0000000000000000000000000", "run": "evalrun_0000000000000000000000000",
        "item": "outputitem_000000000000000000000000"}
PATH_PARAM_KIND = {"file_id": "file", "fine_tuning_job_id": "job", "model_id": "adapter",
                   "tenant_id": "tenant", "key_id": "key", "eval_id": "eval", "run_id": "run",
                   "output_item_id": "item"}


def peft_zip(base_dir: str, P: int, seed: int) -> bytes:
    from transformers import AutoConfig

    from app.ml.adapter import Adapter, export_peft_zip
    from app.ml.kvcache import ModelGeometry
    from app.ml.prefix import PrefixConfig

    g = ModelGeometry.of(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    table = torch.randn(P, cfg.table_width, generator=torch.Generator().manual_seed(seed))
    return export_peft_zip(Adapter.from_table(table, cfg, "set-by-import"))


def upload(client: httpx.Client, text: str = GOOD_JSONL) -> str:
    r = client.post("/v1/files", files={"file": ("data.jsonl", text.encode(), "application/jsonl")},
                    data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/files/{fid}").json()["status"] == "uploaded":
        assert time.monotonic() < deadline, "file never validated"
        time.sleep(0.1)
    assert client.get(f"/v1/files/{fid}").json()["status"] == "processed"
    return fid


def small_job(base: str, training_file: str, **prefix) -> dict:
    return {"model": base, "training_file": training_file,
            "method": {"type": "prefix", "prefix": {"num_virtual_tokens": 4, **prefix,
                                                    "hyperparameters": {"n_epochs": 1}}}}


def spec_ops(spec: dict) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if m in METHODS}


def fill(path: str, ids: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1).split(":")[0]
        assert name in PATH_PARAM_KIND, f"path parameter {name!r} of {path} is unknown to the walker"
        return ids[PATH_PARAM_KIND[name]]
    return re.sub(r"\{([^}]+)\}", sub, path)


def _request(client: httpx.Client, method: str, url: str, kw: dict) -> httpx.Response:
    return client.request(method, url, **kw)


def _normalise(resp: httpx.Response, ids: dict[str, str]) -> tuple[int, str]:
    text = resp.text
    for kind, value in ids.items():  # the only difference allowed is the id the caller sent
        text = text.replace(value, f"<{kind}>")
    return resp.status_code, re.sub(r"req_[0-9a-f]+", "<rid>", text)


# ------------------------------------------------------------------ the cases, one per operation
# Each case: (METHOD, template) -> function(ctx) -> list of (url template, request kwargs, expected status).
# Expected 404 means: "exactly what a nonexistent id gets", checked against FAKE ids.

def _files_upload(ctx):
    return [("/v1/files", {"files": {"file": ("b.jsonl", GOOD_JSONL.encode(), "application/jsonl")},
                           "data": {"purpose": "fine-tune"}}, 200)]


def _import(ctx):
    return [("/v1/models/import", {"files": {"file": ("a.zip", ctx["zip_b"], "application/zip")}}, 201)]


def _job_create(ctx):
    return [
        ("/v1/fine_tuning/jobs", {"json": small_job(ctx["base"], "{file}")}, 404),
        ("/v1/fine_tuning/jobs", {"json": {**small_job(ctx["base"], ctx["b_file"]),
                                           "validation_file": "{file}"}}, 404),
        ("/v1/fine_tuning/jobs", {"json": small_job(ctx["base"], ctx["b_file"], init="adapter",
                                                    init_adapter="{adapter}")}, 404),
        ("/v1/fine_tuning/jobs", {"json": small_job("{adapter}", ctx["b_file"])}, 404),
    ]


def _infer(path: str, extra: dict):
    return lambda ctx: [(path, {"json": {"model": "{adapter}", **extra}}, 404)]


def _list(path: str, kind: str):
    return lambda ctx: [(path, {"params": {"after": "{" + kind + "}"}}, "same")]


def _by_id(path: str):
    return lambda ctx: [(path, {}, 404)]


EVAL_ITEM_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "string"}},
                    "required": ["q", "a"]}
EVAL_CRITERIA = [{"type": "string_check", "name": "exact", "operation": "eq",
                  "input": "{{sample.output_text}}", "reference": "{{item.a}}"}]


def _eval_create(ctx):
    return [("/v1/evals", {"json": {"name": "b", "testing_criteria": EVAL_CRITERIA,
                                    "data_source_config": {"type": "custom", "item_schema": EVAL_ITEM_SCHEMA,
                                                           "include_sample_schema": True}}}, 200)]


def eval_run_body(model: str, file_id: str | None = None) -> dict:
    source = ({"type": "file_id", "id": file_id} if file_id else
              {"type": "file_content", "content": [{"item": {"q": "hi", "a": " x"}}]})
    return {"name": "r", "data_source": {"type": "completions", "model": model, "source": source,
                                         "input_messages": {"type": "template", "template": [
                                             {"role": "user", "content": "{{item.q}}"}]},
                                         "sampling_params": {"max_completion_tokens": 2}}}


def _run_create(ctx):
    return [("/v1/evals/{eval_id}/runs", {"json": eval_run_body(ctx["base"])}, 404),
            (f"/v1/evals/{ctx['b_eval']}/runs", {"json": eval_run_body("{adapter}")}, 404),
            (f"/v1/evals/{ctx['b_eval']}/runs", {"json": eval_run_body(ctx["base"], "{file}")}, 404)]


CASES = {
    ("POST", "/v1/files"): _files_upload,
    ("GET", "/v1/files"): _list("/v1/files", "file"),
    ("GET", "/v1/files/{file_id}"): _by_id("/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"): _by_id("/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"): _by_id("/v1/files/{file_id}/content"),
    ("POST", "/v1/fine_tuning/jobs"): _job_create,
    ("GET", "/v1/fine_tuning/jobs"): _list("/v1/fine_tuning/jobs", "job"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): _by_id("/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"):
        _by_id("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"):
        _by_id("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"):
        _by_id("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("GET", "/v1/models"): lambda ctx: [("/v1/models", {}, 200)],
    ("GET", "/v1/models/{model_id}"): _by_id("/v1/models/{model_id}"),
    ("GET", "/v1/models/{model_id}/export"): _by_id("/v1/models/{model_id}/export"),
    ("DELETE", "/v1/models/{model_id}"): _by_id("/v1/models/{model_id}"),
    ("POST", "/v1/models/import"): _import,
    ("POST", "/v1/completions"): _infer("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions"): _infer("/v1/chat/completions",
                                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/classify"): _infer("/v1/classify", {"input": "hi", "labels": [" a", " b"]}),
    ("POST", "/v1/evals"): _eval_create,
    ("GET", "/v1/evals"): _list("/v1/evals", "eval"),
    ("GET", "/v1/evals/{eval_id}"): _by_id("/v1/evals/{eval_id}"),
    ("POST", "/v1/evals/{eval_id}"): lambda ctx: [("/v1/evals/{eval_id}", {"json": {"name": "renamed"}}, 404)],
    ("DELETE", "/v1/evals/{eval_id}"): _by_id("/v1/evals/{eval_id}"),
    ("POST", "/v1/evals/{eval_id}/runs"): _run_create,
    ("GET", "/v1/evals/{eval_id}/runs"): _by_id("/v1/evals/{eval_id}/runs"),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}"): _by_id("/v1/evals/{eval_id}/runs/{run_id}"),
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}"): _by_id("/v1/evals/{eval_id}/runs/{run_id}"),
    ("DELETE", "/v1/evals/{eval_id}/runs/{run_id}"): _by_id("/v1/evals/{eval_id}/runs/{run_id}"),
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}/cancel"): _by_id("/v1/evals/{eval_id}/runs/{run_id}/cancel"),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items"):
        _by_id("/v1/evals/{eval_id}/runs/{run_id}/output_items"),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"):
        _by_id("/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"),
}

# admin operations are called with A's ids and destructive bodies: if auth failed open, A's state changes
ADMIN_BODIES = {
    ("POST", "/v1/admin/tenants"): {"json": {"name": "intruder"}},
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): {"json": {"suspended": True, "quotas": {"files": 0}}},
    ("POST", "/v1/admin/serving"): {"json": {"model": "{adapter}"}},
}


def _subst(obj, ids: dict[str, str]):
    if isinstance(obj, str):
        for kind, value in ids.items():
            obj = obj.replace("{" + kind + "}", value)
        return obj
    if isinstance(obj, dict):
        return {k: _subst(v, ids) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_subst(v, ids) for v in obj)
    return obj


# ------------------------------------------------------------------ the test

@pytest.fixture(scope="module")
def svc(embedded_service):
    embedded_service.wait_ready()
    return embedded_service


def snapshot(svc, a, ids) -> dict:
    """Everything A (and the admin) can see of A's resources."""
    c = a.client
    out = {}
    for url in (f"/v1/files/{ids['file']}", "/v1/files", f"/v1/fine_tuning/jobs/{ids['job']}",
                "/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{ids['job']}/events",
                f"/v1/fine_tuning/jobs/{ids['job']}/checkpoints", f"/v1/models/{ids['adapter']}",
                f"/v1/evals/{ids['eval']}", f"/v1/evals/{ids['eval']}/runs/{ids['run']}"):
        r = c.get(url)
        assert r.status_code == 200, (url, r.text)
        out[url] = r.json()
    out["models"] = sorted(m["id"] for m in c.get("/v1/models").json()["data"])
    for url in (f"/v1/files/{ids['file']}/content", f"/v1/models/{ids['adapter']}/export"):
        r = c.get(url)
        assert r.status_code == 200, (url, r.text)
        out[url] = hashlib.sha256(r.content).hexdigest()
    out["tenant"] = svc.admin.get(f"/v1/admin/tenants/{a.id}").json()
    out["keys"] = svc.admin.get(f"/v1/admin/tenants/{a.id}/keys").json()
    return out


def test_isolation_walk_every_route(svc, tiny_base_dirs):
    a, b = svc.make_tenant("iso-a"), svc.make_tenant("iso-b")
    spec = svc.client().get("/openapi.json").json()
    ops = spec_ops(spec)
    admin_ops = {op for op in ops if op[1].startswith("/v1/admin/")}
    tenant_ops = ops - admin_ops - PUBLIC_OPS
    # every operation is covered; a new route fails here until the walker knows it
    assert tenant_ops == set(CASES), (f"not walked: {sorted(tenant_ops - set(CASES))}; "
                                      f"stale cases: {sorted(set(CASES) - tenant_ops)}")
    assert all(p.startswith("/v1/") for _, p in tenant_ops | admin_ops)
    assert {k for k in ADMIN_BODIES} <= admin_ops

    # ---- A's resources
    base = next(m["id"] for m in a.client.get("/v1/models").json()["data"] if m["kind"] == "base" and m["served"])
    a_file = upload(a.client)
    r = a.client.post("/v1/models/import", files={"file": ("a.zip", peft_zip(tiny_base_dirs["gpt2"], 4, 1),
                                                           "application/zip")}, data={"suffix": "iso"})
    assert r.status_code == 201, r.text
    a_adapter = r.json()["id"]
    r = a.client.post("/v1/fine_tuning/jobs", json=small_job(base, a_file))
    assert r.status_code == 200, r.text
    a_job = r.json()["id"]
    assert r.json()["status"] in ("validating_files", "queued")  # no worker: it never trains
    assert a.client.get(f"/v1/fine_tuning/jobs/{a_job}/events").json()["data"], "A's job has no events"
    r = a.client.post("/v1/evals", json=_eval_create({})[0][1]["json"])
    assert r.status_code == 200, r.text
    a_eval = r.json()["id"]
    r = a.client.post(f"/v1/evals/{a_eval}/runs", json=eval_run_body(a_adapter))
    assert r.status_code == 200, r.text
    ids = {"file": a_file, "job": a_job, "adapter": a_adapter, "tenant": a.id, "key": a.key_id,
           "eval": a_eval, "run": r.json()["id"], "item": FAKE["item"]}
    fake = dict(FAKE)
    fake["adapter"] = a_adapter.replace(a.id, FAKE["tenant"]).rsplit(":", 1)[0] + ":import-0000000000000000"
    b_file = upload(b.client)
    r = b.client.post("/v1/evals", json=_eval_create({})[0][1]["json"])
    assert r.status_code == 200, r.text
    ctx = {"base": base, "b_file": b_file, "zip_b": peft_zip(tiny_base_dirs["gpt2"], 4, 2), "b_eval": r.json()["id"]}

    before = snapshot(svc, a, ids)
    bodies: list[str] = []  # every response body, to look for leaked keys
    walked: set[tuple[str, str]] = set()

    # ---- tenant B against A's resources
    for op in sorted(CASES):
        for url_t, kw, expected in CASES[op](ctx):
            url_a, kw_a = fill(_subst(url_t, ids), ids), _subst(kw, ids)
            r = _request(b.client, op[0], url_a, kw_a)
            bodies.append(r.text)
            if expected == "same" or expected == 404:
                url_f, kw_f = fill(_subst(url_t, fake), fake), _subst(kw, fake)
                rf = _request(b.client, op[0], url_f, kw_f)
                if expected == 404:
                    assert r.status_code == 404, (op, url_a, r.status_code, r.text)
                assert _normalise(r, ids) == _normalise(rf, fake), (op, url_a, r.text, rf.text)
            else:
                assert r.status_code == expected, (op, url_a, r.text)
                if op == ("POST", "/v1/models/import"):
                    assert b.id in r.json()["id"]
                    assert b.client.delete(f"/v1/models/{r.json()['id']}").status_code == 200
                if op == ("POST", "/v1/files"):
                    assert b.client.delete(f"/v1/files/{r.json()['id']}").status_code == 200
                if op == ("GET", "/v1/models"):
                    assert a_adapter not in {m["id"] for m in r.json()["data"]}
            walked.add(op)
    # B's lists never show A's resources
    assert a_file not in {f["id"] for f in b.client.get("/v1/files").json()["data"]}
    assert a_job not in {j["id"] for j in b.client.get("/v1/fine_tuning/jobs").json()["data"]}

    # ---- admin operations: 403 with a tenant key, 401 with none or a bad one
    anon, bad = svc.client(), svc.client("sk-" + "x" * 43)
    for op in sorted(admin_ops):
        url = fill(op[1], ids)
        kw = _subst(ADMIN_BODIES.get(op, {}), ids)
        for client, status in ((b.client, 403), (a.client, 403), (anon, 401), (bad, 401)):
            r = _request(client, op[0], url, kw)
            bodies.append(r.text)
            assert r.status_code == status, (op, status, r.text)
            assert r.json()["error"]["type"] == ("permission_error" if status == 403 else "authentication_error")
        walked.add(op)

    # ---- every /v1/* operation needs a key
    for op in sorted(tenant_ops):
        r = _request(anon, op[0], fill(op[1], ids), {})
        assert r.status_code == 401, (op, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"
        r = _request(bad, op[0], fill(op[1], ids), {})
        assert r.status_code == 401, (op, r.text)
        bodies.append(r.text)
    # the admin key names no tenant
    for op in sorted(tenant_ops):
        if not re.search(r"\{", op[1]) and op[0] == "GET":
            assert svc.admin.get(op[1]).status_code == 403, op

    assert walked == tenant_ops | admin_ops

    # ---- A is untouched and still works
    after = snapshot(svc, a, ids)
    assert after == before
    r = a.client.post("/v1/completions", json={"model": a_adapter, "prompt": "hi", "max_tokens": 2,
                                               "temperature": 0})
    assert r.status_code == 200, r.text
    bodies.append(json.dumps(after))

    # ---- a revoked key stops at once; the tenant's other key keeps working
    r = svc.admin.post(f"/v1/admin/tenants/{b.id}/keys")
    assert r.status_code == 201
    k2 = r.json()
    c2 = svc.client(k2["api_key"])
    assert c2.get("/v1/files").status_code == 200
    assert svc.admin.delete(f"/v1/admin/tenants/{b.id}/keys/{k2['id']}").status_code == 200
    r = c2.get("/v1/files")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = c2.post("/v1/completions", json={"model": base, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401
    bodies.append(r.text)
    assert b.client.get("/v1/files").status_code == 200
    keys_listed = svc.admin.get(f"/v1/admin/tenants/{b.id}/keys").json()
    bodies.append(json.dumps(keys_listed))

    # ---- keys never appear in responses (other than at creation), events or logs
    secrets_ = {"A": a.key, "B": b.key, "B2 (revoked)": k2["api_key"], "admin": svc.admin_key}
    blob = "\n".join(bodies)
    for name, key in secrets_.items():
        assert key not in blob, f"{name} key leaked in a response"
    time.sleep(0.5)  # let the log flush
    log = svc.log_path.read_text(errors="replace")
    for name, key in secrets_.items():
        assert key not in log, f"{name} key leaked in the service log"
        assert hashlib.sha256(key.encode()).hexdigest() not in log, f"{name} key hash in the service log"
