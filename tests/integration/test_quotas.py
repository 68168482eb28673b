"""Per-tenant quotas on the real service: 429 + Retry-After + the OpenAI envelope naming the quota,
for request and token rates, files, storage bytes and adapters; usage and limits in the admin GET.
On the distributed service: racing uploads never pass the files quota, and two API replicas share
one rate budget (the windows are in Redis)."""

from __future__ import annotations

import pytest

from tests.integration.test_files_admin import GOOD, assert_envelope, upload
from tests.integration.test_inference import BASE, complete, geometry_of, import_adapter, peft_zip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def svc(embedded_service):
    embedded_service.wait_ready()
    return embedded_service


def set_quotas(svc, tenant_id: str, **quotas) -> dict:
    r = svc.admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"quotas": quotas})
    assert r.status_code == 200, r.text
    return r.json()


def assert_429(r, quota: str, type_: str) -> dict:
    err = assert_envelope(r, 429, None)
    assert err["type"] == type_ and err["code"] == f"{quota}_quota_exceeded", err
    assert f"{quota} quota of" in err["message"], err
    assert 1 <= int(r.headers["retry-after"]) <= 60
    return err


def test_requests_per_minute(svc):
    t = svc.make_tenant()
    other = svc.make_tenant()
    got = set_quotas(svc, t.id, requests_per_minute=2)
    assert got["limits"]["requests_per_minute"] == 2 and got["limits"]["tokens_per_minute"] >= 200_000
    for _ in range(2):
        assert complete(t.client, BASE, max_tokens=1).status_code == 200
    err = assert_429(complete(t.client, BASE, max_tokens=1), "requests_per_minute", "rate_limit_error")
    assert "requests_per_minute quota of 2 exceeded" in err["message"]
    assert t.client.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 1, "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 429
    assert t.client.post("/v1/classify", json={"model": BASE, "input": "x", "labels": ["a", "b"]}).status_code == 429
    # another tenant is not affected; the official client sees a RateLimitError
    assert complete(other.client, BASE, max_tokens=1).status_code == 200
    import openai

    with pytest.raises(openai.RateLimitError):
        svc.openai(t.key).completions.create(model=BASE, prompt="x", max_tokens=1)
    usage = svc.admin.get(f"/v1/admin/tenants/{t.id}").json()
    assert usage["usage"]["requests_per_minute"] == 2 and usage["limits"]["requests_per_minute"] == 2
    # lifting the override applies at once
    set_quotas(svc, t.id, requests_per_minute=None)
    assert complete(t.client, BASE, max_tokens=1).status_code == 200


def test_tokens_per_minute(svc):
    t = svc.make_tenant()
    set_quotas(svc, t.id, tokens_per_minute=40)
    err = assert_429(complete(t.client, BASE, max_tokens=100), "tokens_per_minute", "rate_limit_error")
    assert "alone needs" in err["message"]
    assert complete(t.client, BASE, max_tokens=20).status_code == 200
    assert_429(complete(t.client, BASE, max_tokens=20), "tokens_per_minute", "rate_limit_error")
    used = svc.admin.get(f"/v1/admin/tenants/{t.id}").json()["usage"]["tokens_per_minute"]
    assert 20 < used <= 40


def test_files_and_storage_quotas(svc):
    t = svc.make_tenant()
    set_quotas(svc, t.id, files=1)
    assert upload(t.client, GOOD).status_code == 200
    r = upload(t.client, GOOD)
    err = assert_429(r, "files", "insufficient_quota")
    assert "files quota of 1 exceeded" in err["message"] and r.headers["x-should-retry"] == "false"
    size = len(GOOD.encode())
    set_quotas(svc, t.id, files=None, storage_bytes=size + 10)
    err = assert_429(upload(t.client, GOOD), "storage_bytes", "insufficient_quota")
    assert f"storage_bytes quota of {size + 10} exceeded" in err["message"]
    assert upload(t.client, "x" * 5, purpose="base-train", filename="c.txt").status_code == 200
    got = svc.admin.get(f"/v1/admin/tenants/{t.id}").json()
    assert got["usage"]["files"] == 2 and got["usage"]["storage_bytes"] == size + 5
    assert got["limits"]["storage_bytes"] == size + 10 and got["limits"]["files"] > 1
    assert set(got["limits"]) <= set(got["usage"])


def test_adapters_quota_on_import_and_job_create(svc, tiny_base_dirs):
    t = svc.make_tenant()
    set_quotas(svc, t.id, adapters=2)
    zipped = peft_zip(geometry_of(tiny_base_dirs["gpt2"]), 4, seed=3)
    assert import_adapter(t.client, zipped, "one").status_code == 201
    f = upload(t.client, GOOD).json()["id"]
    job = {"model": BASE, "training_file": f, "method": {"type": "prefix", "prefix": {
        "num_virtual_tokens": 4, "hyperparameters": {"n_epochs": 1}}}}
    r = t.client.post("/v1/fine_tuning/jobs", json=job)
    assert r.status_code == 200, r.text  # the job will make the second adapter
    jid = r.json()["id"]
    err = assert_429(import_adapter(t.client, zipped, "two"), "adapters", "insufficient_quota")
    assert "adapters quota of 2 exceeded" in err["message"] and "prefix job" in err["message"]
    assert t.client.post(f"/v1/fine_tuning/jobs/{jid}/cancel").status_code == 200
    assert import_adapter(t.client, zipped, "two").status_code == 201
    assert_429(t.client.post("/v1/fine_tuning/jobs", json=job), "adapters", "insufficient_quota")
    got = svc.admin.get(f"/v1/admin/tenants/{t.id}").json()
    assert got["usage"]["adapters"] == 2 and got["limits"]["adapters"] == 2


@pytest.mark.parametrize("path,body,param,setting", [
    ("/v1/completions", {"prompt": "hi " * 3000}, "prompt", "MAX_PROMPT_TOKENS"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1025}, "max_tokens", "MAX_COMPLETION_TOKENS"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "n", "MAX_N"),
    ("/v1/completions", {"prompt": "x", "stop": list("abcde")}, "stop", "MAX_STOP_STRINGS"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop", "MAX_STOP_STRING_CHARS"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 9}, "n", "MAX_N"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000},
     "max_completion_tokens", "MAX_COMPLETION_TOKENS"),
    ("/v1/classify", {"input": "x", "labels": [f"l{i}" for i in range(65)]}, "labels", "MAX_CLASSIFY_LABELS"),
    ("/v1/fine_tuning/jobs", {"training_file": "file-x", "method": {"type": "prefix", "prefix": {
        "hyperparameters": {"n_epochs": 101}}}}, "method.prefix.hyperparameters.n_epochs", "max_n_epochs"),
    ("/v1/fine_tuning/jobs", {"training_file": "file-x", "method": {"type": "prefix", "prefix": {
        "num_virtual_tokens": 513}}}, "method.prefix.num_virtual_tokens", "max_num_virtual_tokens"),
])
def test_limits_are_400s_naming_the_param_and_setting(svc, path, body, param, setting):
    t = svc.make_tenant()
    err = assert_envelope(t.client.post(path, json={"model": BASE, **body}), 400, param)
    assert setting in err["message"], err


def test_jsonl_line_limit_is_reported_in_the_file(svc):
    from tests.integration.test_files_admin import wait_file

    t = svc.make_tenant()
    big = '{"prompt": "' + "x" * (64 * 1024) + '", "completion": " y"}\n'
    f = wait_file(t.client, upload(t.client, GOOD + big).json()["id"])
    assert f["status"] == "error" and "line 21: too long" in f["status_details"], f


# ---------------------------------------------------------------- distributed: replicas and races
# PostgreSQL + Redis + S3 (moto); skipped when PostgreSQL or Redis is not reachable.


def test_concurrent_uploads_never_pass_the_files_quota(distributed_service):
    """12 uploads at once with 3 slots: exactly 3 files, 9 answers of 429 naming the quota (the
    check and the insert share a transaction with the tenant row locked: SELECT ... FOR UPDATE)."""
    import threading

    svc = distributed_service
    t = svc.make_tenant()
    set_quotas(svc, t.id, files=3)
    clients = [svc.client(t.key) for _ in range(12)]
    start = threading.Barrier(len(clients))
    responses = []

    def go(c):
        start.wait()
        responses.append(upload(c, GOOD))

    threads = [threading.Thread(target=go, args=(c,)) for c in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 9, [r.text for r in responses]
    for r in responses:
        if r.status_code == 429:
            err = assert_429(r, "files", "insufficient_quota")
            assert "files quota of 3 exceeded" in err["message"]
    listed = t.client.get("/v1/files").json()["data"]
    assert len(listed) == 3 and {f["id"] for f in listed} == {r.json()["id"] for r in responses if r.status_code == 200}
    assert svc.admin.get(f"/v1/admin/tenants/{t.id}").json()["usage"]["files"] == 3


def test_api_replicas_share_one_rate_budget(distributed_service, tmp_path):
    """Two API processes on the same PostgreSQL, Redis and S3 (K replicas behind a load balancer):
    a requests_per_minute quota of 4 admits 4 requests in total, not 4 per replica."""
    from tests.integration.conftest import ServiceProcess

    svc = distributed_service
    data_dir = tmp_path / "replica2"
    data_dir.mkdir()
    replica = ServiceProcess(dict(svc.env, DATA_DIR=str(data_dir)), data_dir, "distributed").start()
    try:
        replica.wait_ready()
        svc.wait_ready()
        t = svc.make_tenant()
        set_quotas(svc, t.id, requests_per_minute=4, tokens_per_minute=1000)
        c1, c2 = t.client, replica.client(t.key)
        for c in (c1, c2, c1, c2):
            r = complete(c, BASE, max_tokens=1)
            assert r.status_code == 200, r.text
        for c in (c1, c2):
            assert_429(complete(c, BASE, max_tokens=1), "requests_per_minute", "rate_limit_error")
        # both replicas report the one shared window
        for admin in (svc.admin, replica.admin):
            usage = admin.get(f"/v1/admin/tenants/{t.id}").json()["usage"]
            assert usage["requests_per_minute"] == 4 and 4 < usage["tokens_per_minute"] <= 1000, usage
    finally:
        replica.stop()
