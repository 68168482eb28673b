"""Over HTTP against a real uvicorn process: tenants and keys, auth, the error envelope,
file upload/validation/list/content/delete, isolation, limits, health and metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

GOOD = "".join(json.dumps({"prompt": f"q{i} ->", "completion": f" a{i}"}) + "\n" for i in range(20))
BAD = (json.dumps({"prompt": "ok", "completion": " fine"}) + "\n"
       + "this is not json\n"
       + json.dumps({"prompt": "no completion"}) + "\n"
       + json.dumps({"prompt": "p", "completion": ""}) + "\n")


def assert_envelope(r: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param != "__any__":
        assert err["param"] == param, err
    assert r.headers.get("x-request-id")
    return err


def upload(client: httpx.Client, content: str | bytes, purpose="fine-tune", filename="data.jsonl"):
    data = content.encode() if isinstance(content, str) else content
    return client.post("/v1/files", files={"file": (filename, data, "application/jsonl")}, data={"purpose": purpose})


def wait_file(client: httpx.Client, file_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = client.get(f"/v1/files/{file_id}").json()
        if f["status"] != "uploaded":
            return f
        time.sleep(0.1)
    raise AssertionError(f"file {file_id} still uploaded after {timeout}s")


# ------------------------------------------------------------------ auth and admin

def test_auth_rules(embedded_service):
    svc = embedded_service
    anon = svc.client()
    assert_envelope(anon.get("/v1/files"), 401)
    assert_envelope(anon.get("/v1/admin/tenants"), 401)
    assert_envelope(svc.client("sk-wrong").get("/v1/files"), 401)
    r = anon.get("/v1/files", headers={"Authorization": "Basic abc"})
    assert_envelope(r, 401)
    t = svc.make_tenant("acme")
    assert t.key.startswith("sk-")
    err = assert_envelope(t.client.get("/v1/admin/tenants"), 403)
    assert t.key not in json.dumps(err)
    assert_envelope(t.client.post("/v1/admin/tenants", json={"name": "x"}), 403)
    # the admin key names no tenant: 403 on tenant routes
    assert_envelope(svc.admin.get("/v1/files"), 403)
    assert t.client.get("/v1/files").status_code == 200
    # public routes need no key
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
        assert anon.get(path).status_code == 200, path
    assert anon.get("/readyz").status_code in (200, 503)


def test_tenant_admin_lifecycle(embedded_service):
    svc = embedded_service
    r = svc.admin.post("/v1/admin/tenants", json={"name": "Lifecycle"})
    assert r.status_code == 201
    body = r.json()
    assert body["object"] == "tenant" and body["name"] == "Lifecycle" and body["id"]
    assert isinstance(body["created_at"], int) and body["api_key"].startswith("sk-")
    tid, key1 = body["id"], body["api_key"]
    listed = svc.admin.get("/v1/admin/tenants").json()
    assert listed["object"] == "list" and tid in [t["id"] for t in listed["data"]]
    assert all("api_key" not in t for t in listed["data"])
    got = svc.admin.get(f"/v1/admin/tenants/{tid}").json()
    assert got["id"] == tid and got["usage"]["files"] == 0 and "api_key" not in got
    assert_envelope(svc.admin.get("/v1/admin/tenants/tenant-nope"), 404)

    r = svc.admin.post(f"/v1/admin/tenants/{tid}/keys")
    assert r.status_code == 201
    k2 = r.json()
    assert set(k2) >= {"id", "api_key", "created_at"} and k2["api_key"] != key1
    c1, c2 = svc.client(key1), svc.client(k2["api_key"])
    assert c1.get("/v1/files").status_code == 200 and c2.get("/v1/files").status_code == 200
    # revoking takes effect at once; the other key keeps working
    assert svc.admin.delete(f"/v1/admin/tenants/{tid}/keys/{k2['id']}").status_code == 200
    assert_envelope(c2.get("/v1/files"), 401)
    assert c1.get("/v1/files").status_code == 200
    assert_envelope(svc.admin.delete(f"/v1/admin/tenants/{tid}/keys/key-nope"), 404)
    # another tenant's key id cannot be revoked through this tenant
    other = svc.make_tenant()
    assert_envelope(svc.admin.delete(f"/v1/admin/tenants/{tid}/keys/{other.key_id}"), 404)
    assert other.client.get("/v1/files").status_code == 200

    # suspend -> 403, unsuspend -> back
    assert svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"suspended": True}).json()["suspended"] is True
    assert assert_envelope(c1.get("/v1/files"), 403)["code"] == "tenant_suspended"
    svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"suspended": False})
    assert c1.get("/v1/files").status_code == 200
    assert_envelope(svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"bogus": 1}), 400, "bogus")
    q = svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"quotas": {"files": 5, "running_jobs": 1}}).json()
    assert q["quotas"] == {"files": 5, "running_jobs": 1} and q["usage"]["files"] == 0
    q = svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"quotas": {"files": None}}).json()
    assert q["quotas"] == {"running_jobs": 1}
    assert_envelope(svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"quotas": {"nope": 1}}), 400, "quotas.nope")
    assert_envelope(svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"quotas": {"files": -1}}), 400, "quotas.files")
    assert_envelope(svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"quotas": {"files": "5"}}), 400, "quotas.files")
    assert_envelope(svc.admin.patch(f"/v1/admin/tenants/{tid}", json={"suspended": "yes"}), 400, "suspended")
    assert_envelope(svc.admin.get("/v1/admin/tenants/bad%00id"), 404)
    assert_envelope(svc.admin.post("/v1/admin/tenants", json={"name": "a\u0000b"}), 400, "name")

    # delete the tenant: files, blobs and keys go with it
    f = upload(c1, GOOD).json()
    blob = svc.data_dir / "blobs" / "files" / tid / f["id"]
    assert blob.is_file()
    r = svc.admin.delete(f"/v1/admin/tenants/{tid}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not blob.exists()
    assert_envelope(c1.get("/v1/files"), 401)
    assert_envelope(svc.admin.get(f"/v1/admin/tenants/{tid}"), 404)


def test_bad_admin_bodies(embedded_service):
    a = embedded_service.admin
    assert_envelope(a.post("/v1/admin/tenants", json={}), 400, "name")
    assert_envelope(a.post("/v1/admin/tenants", json={"name": ""}), 400, "name")
    assert_envelope(a.post("/v1/admin/tenants", json={"name": "x", "extra": 1}), 400, "extra")
    bad_json = a.post("/v1/admin/tenants", content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope(bad_json, 400)
    assert_envelope(a.post("/v1/admin/tenants", json=["x"]), 400)


# ------------------------------------------------------------------ framework errors, request ids


def test_framework_errors_use_the_envelope(embedded_service):
    c = embedded_service.client()
    assert_envelope(c.get("/v1/nope"), 404)
    assert_envelope(c.get("/nope/at/all"), 404)
    assert_envelope(c.delete("/healthz"), 405)
    r = c.put("/v1/admin/tenants")
    assert_envelope(r, 405)
    assert r.headers["allow"] == "GET, POST"  # every method of the path, not just one route's
    # request ids: fresh when absent or invalid, echoed when valid
    r1, r2 = c.get("/healthz"), c.get("/healthz")
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
    assert c.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert c.get("/healthz", headers={"X-Request-Id": "bad id\t<x>"}).headers["x-request-id"] != "bad id\t<x>"


def test_openapi_declares_error_models(embedded_service):
    spec = embedded_service.client().get("/openapi.json").json()
    op = spec["paths"]["/v1/files"]["post"]
    assert "400" in op["responses"] and "401" in op["responses"] and "422" not in op["responses"]
    assert "ErrorResponse" in spec["components"]["schemas"]


# ------------------------------------------------------------------ files


def test_upload_validate_list_content_delete(embedded_service):
    svc = embedded_service
    t = svc.make_tenant()
    r = upload(t.client, GOOD, filename="../../etc/passwd.jsonl")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["bytes"] == len(GOOD.encode())
    assert f["filename"] == "passwd.jsonl" and f["status"] in ("uploaded", "processed")
    assert set(f) >= {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
    done = wait_file(t.client, f["id"])
    assert done["status"] == "processed" and done["row_count"] == 20 and done["token_count"] > 0

    bad = wait_file(t.client, upload(t.client, BAD).json()["id"])
    assert bad["status"] == "error"
    d = bad["status_details"]
    assert "line 2: not JSON" in d and 'line 3: missing field "completion"' in d and "line 4: empty completion" in d

    utf = wait_file(t.client, upload(t.client, b'{"prompt": "\xff", "completion": "x"}\n').json()["id"])
    assert utf["status"] == "error" and "line 1: not UTF-8" in utf["status_details"]

    corpus = wait_file(t.client, upload(t.client, "doc one\n\ndoc two\n", "base-train", "c.txt").json()["id"])
    assert corpus["status"] == "processed" and corpus["row_count"] == 2 and corpus["purpose"] == "base-train"

    assert_envelope(upload(t.client, GOOD, purpose="nope"), 400, "purpose")
    assert_envelope(t.client.post("/v1/files", data={"purpose": "fine-tune"}), 400, "file")
    assert_envelope(t.client.post("/v1/files", files={"file": ("a.jsonl", b"x")}), 400, "purpose")
    empty = wait_file(t.client, upload(t.client, b"").json()["id"])
    assert empty["status"] == "error" and "empty" in empty["status_details"]
    t.client.delete(f"/v1/files/{empty['id']}")

    # content is the uploaded bytes
    r = t.client.get(f"/v1/files/{f['id']}/content")
    assert r.status_code == 200 and r.content == GOOD.encode()

    # list, filter, paginate
    lst = t.client.get("/v1/files").json()
    assert lst["object"] == "list" and len(lst["data"]) == 4 and lst["has_more"] is False
    assert [x["id"] for x in t.client.get("/v1/files", params={"purpose": "base-train"}).json()["data"]] == [
        corpus["id"]
    ]
    seen, after = [], None
    while True:
        page = t.client.get("/v1/files", params={"limit": 1, **({"after": after} if after else {})}).json()
        seen += [x["id"] for x in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert sorted(seen) == sorted(x["id"] for x in lst["data"]) and len(seen) == 4
    assert_envelope(t.client.get("/v1/files", params={"limit": 0}), 400, "limit")

    # delete
    r = t.client.delete(f"/v1/files/{bad['id']}")
    assert r.status_code == 200 and r.json() == {"id": bad["id"], "object": "file", "deleted": True}
    assert_envelope(t.client.get(f"/v1/files/{bad['id']}"), 404)
    assert_envelope(t.client.delete(f"/v1/files/{bad['id']}"), 404)
    assert not (svc.data_dir / "blobs" / "files" / t.id / bad["id"]).exists()


def test_other_tenants_files_are_404(embedded_service):
    svc = embedded_service
    a, b = svc.make_tenant("A"), svc.make_tenant("B")
    fa = upload(a.client, GOOD).json()
    for method, path in (
        ("GET", f"/v1/files/{fa['id']}"),
        ("GET", f"/v1/files/{fa['id']}/content"),
        ("DELETE", f"/v1/files/{fa['id']}"),
    ):
        err = assert_envelope(b.client.request(method, path), 404)
        assert "A" != err["message"]
    assert fa["id"] not in [f["id"] for f in b.client.get("/v1/files").json()["data"]]
    assert_envelope(b.client.get("/v1/files", params={"after": fa["id"]}), 404, "after")
    assert_envelope(b.client.get("/v1/files", params={"purpose": "x\x00"}), 400, "purpose")
    assert_envelope(b.client.get("/v1/files/a%00b"), 404)
    assert a.client.get(f"/v1/files/{fa['id']}").status_code == 200  # untouched


def test_delete_file_used_by_active_job_is_409(embedded_service):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.store.tables import Job

    svc = embedded_service
    t = svc.make_tenant()
    f = wait_file(t.client, upload(t.client, GOOD).json()["id"])
    engine = create_engine(f"sqlite:///{svc.data_dir / 'prefixd.db'}")
    with Session(engine) as s:
        job = Job(tenant_id=t.id, kind="prefix", model="default", training_file=f["id"], status="running")
        s.add(job)
        s.commit()
        jid = job.id
    err = assert_envelope(t.client.delete(f"/v1/files/{f['id']}"), 409)
    assert err["code"] == "file_in_use" and jid in err["message"]
    with Session(engine) as s:
        s.get(Job, jid).status = "succeeded"
        s.commit()
    engine.dispose()
    assert t.client.delete(f"/v1/files/{f['id']}").status_code == 200


def test_upload_limits_413_and_readyz_without_model(start_service):
    svc = start_service("embedded", env={"MAX_UPLOAD_BYTES": "2000", "SERVING_ENABLED": "0"})
    t = svc.make_tenant()
    small = GOOD.encode()[:1500]
    small = small[: small.rfind(b"\n") + 1]
    assert upload(t.client, small).status_code == 200
    # over the file limit, within the multipart slack: the route's exact check
    err = assert_envelope(upload(t.client, b"x" * 2500), 413)
    assert "2000" in err["message"]
    # a declared Content-Length far over the limit is refused before the body is read
    assert_envelope(upload(t.client, b"x" * 200_000), 413)

    # a chunked body (no Content-Length) is counted while it streams
    def gen():
        boundary = b"--BOUNDARY\r\n"
        yield boundary + b'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(200):
            yield b"y" * 1000
        yield b"\r\n--BOUNDARY--\r\n"

    r = t.client.post("/v1/files", content=gen(), headers={"content-type": "multipart/form-data; boundary=BOUNDARY"})
    assert_envelope(r, 413)
    assert svc.client().get("/healthz").status_code == 200
    # nothing but the one good file was stored
    assert len(t.client.get("/v1/files").json()["data"]) == 1
    # the same process serves no model: /readyz says so
    check_readyz_503_without_model(svc)


# ------------------------------------------------------------------ health and metrics


def test_health_ready_metrics(embedded_service):
    c = embedded_service.client()
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code in (200, 503)
    checks = r.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"] == "ok" and checks["storage"] == "ok"
    assert (r.status_code == 200) == (checks["model"] == "ok")
    t = embedded_service.make_tenant()
    t.client.get("/v1/files/file-doesnotexist")
    text = c.get("/metrics").text
    assert "prefixd_http_requests_total" in text
    assert 'route="/v1/files/{file_id}"' in text
    assert "file-doesnotexist" not in text
    assert "prefixd_jobs" in text


def check_readyz_503_without_model(svc):
    r = svc.client().get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready" and body["checks"]["model"] != "ok"


# ------------------------------------------------------------------ distributed smoke


def test_distributed_smoke(distributed_service):
    svc = distributed_service
    checks = svc.client().get("/readyz").json()["checks"]
    assert checks["database"] == checks["broker"] == checks["storage"] == "ok", checks
    a, b = svc.make_tenant(), svc.make_tenant()
    f = wait_file(a.client, upload(a.client, GOOD).json()["id"])
    assert f["status"] == "processed" and f["row_count"] == 20
    assert a.client.get(f"/v1/files/{f['id']}/content").content == GOOD.encode()
    assert_envelope(b.client.get(f"/v1/files/{f['id']}"), 404)
    bad = wait_file(a.client, upload(a.client, BAD).json()["id"])
    assert bad["status"] == "error" and "line 2: not JSON" in bad["status_details"]
    assert a.client.delete(f"/v1/files/{f['id']}").json()["deleted"] is True
    assert svc.admin.delete(f"/v1/admin/tenants/{a.id}").status_code == 200
    assert_envelope(a.client.get("/v1/files"), 401)


# ------------------------------------------------------------------ admin key file (no process)


def test_embedded_admin_key_generated_once(tmp_path):
    import os
    import stat

    from app.api.deps import load_or_create_admin_key
    from app.config import Settings

    s = Settings(data_dir=tmp_path, admin_api_key=None)
    k1, generated = load_or_create_admin_key(s)
    assert generated and k1
    assert stat.S_IMODE(os.stat(tmp_path / "admin_key").st_mode) == 0o600
    assert load_or_create_admin_key(s) == (k1, False)
    assert load_or_create_admin_key(Settings(data_dir=tmp_path, admin_api_key="given")) == ("given", False)
    dist = Settings(data_dir=tmp_path / "d", admin_api_key=None, database_url="postgresql://x/y")
    assert load_or_create_admin_key(dist) == (None, False)
