"""The error envelope and the request middleware, in-process (no server needed)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.api.errors import APIError, install_error_handlers
from app.api.middleware import RequestContextMiddleware


class Body(BaseModel):
    name: str
    items: list[int] = []


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, body_limit=lambda method, path: 1000)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret sk-should-not-leak")

    @app.get("/conflict")
    def conflict():
        raise APIError(409, "busy", code="busy", headers={"x-should-retry": "false"})

    @app.post("/items/{item_id}")
    def items(item_id: int, body: Body):
        return {"ok": True}

    return app


def test_unhandled_is_500_envelope_without_secrets(caplog):
    c = TestClient(make_app(), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR):
        r = c.get("/boom", headers={"X-Request-Id": "rid-1"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "rid-1" in err["message"] and "sk-should" not in r.text
    assert r.headers["x-request-id"] == "rid-1"


def test_api_error_status_headers_and_shape():
    r = TestClient(make_app()).get("/conflict")
    assert r.status_code == 409 and r.headers["x-should-retry"] == "false"
    assert r.json() == {"error": {"message": "busy", "type": "conflict_error", "param": None, "code": "busy"}}


def test_validation_errors_are_400_with_param_path():
    c = TestClient(make_app())
    r = c.post("/items/1", json={"name": "x", "items": [1, "a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[1]"
    r = c.post("/items/abc", json={"name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "item_id"
    r = c.post("/items/1", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert "Missing required parameter" in r.json()["error"]["message"]
    r = c.post("/items/1", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_body_limit_413_and_framework_404_405():
    c = TestClient(make_app())
    r = c.post("/items/1", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"] and r.headers["x-request-id"]
    assert c.get("/nope").json()["error"]["type"] == "not_found_error"
    assert c.delete("/conflict").status_code == 405


def test_full_queue_429_says_whose_queue_is_full():
    from app.api.completions import _queue_full
    from app.serving.scheduler import QueueFullError

    server = _queue_full(QueueFullError(256, 256, retry_after_s=2))
    tenant = _queue_full(QueueFullError(192, 192, retry_after_s=1, tenant=True))
    assert server.status_code == tenant.status_code == 429
    assert server.code == "server_busy" and "at capacity" in server.message
    assert tenant.code == "tenant_queue_full" and "your share" in tenant.message.lower()
    assert tenant.headers["Retry-After"] == "1" and server.headers["Retry-After"] == "2"
