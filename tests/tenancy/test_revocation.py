"""The window between auth and submit: a request authenticated just before its key was revoked (or
its tenant suspended) reaches the engine after the admin's cancel ran; the route cancels it itself
(app/api/completions.py `stop_if_revoked`, app/api/deps.py `RecentlyStopped`). The HTTP test of
revocation is tests/integration/test_revoke_inflight.py."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.datastructures import State

from app.api.completions import _submit, credential
from app.tenancy.stop_broadcast import RecentlyStopped, recently_stopped


class FakeEngine:
    def __init__(self):
        self.cancelled: list[tuple[str, str]] = []

    def submit_generation(self, tenant_id, requests, **kw):
        return SimpleNamespace(tenant_id=tenant_id, key=kw.get("key"))

    def cancel_key(self, key, reason="the API key was revoked"):
        self.cancelled.append(("key", key))
        return 1

    def cancel_tenant(self, tenant_id, reason="the tenant was suspended"):
        self.cancelled.append(("tenant", tenant_id))
        return 1


def _request(key: str):
    return SimpleNamespace(app=SimpleNamespace(state=State()), headers={"authorization": f"Bearer {key}"})


def test_rows_submitted_after_the_revocation_are_cancelled_by_the_route():
    engine, req = FakeEngine(), _request("sk-one")
    _submit(engine, req, "tenant-a", [], "fp", False)
    assert engine.cancelled == []  # nothing revoked: nothing cancelled
    recently_stopped(req.app).add(f"key:{credential(req)}")  # what the admin's revoke_key records
    _submit(engine, req, "tenant-a", [], "fp", False)
    assert engine.cancelled == [("key", credential(req))]
    other = _request("sk-two")
    other.app = req.app
    _submit(engine, other, "tenant-a", [], "fp", False)  # the tenant's other key is untouched
    assert len(engine.cancelled) == 1


def test_suspension_cancels_and_unsuspension_forgets():
    engine, req = FakeEngine(), _request("sk-one")
    stopped = recently_stopped(req.app)
    stopped.add("tenant:tenant-a")
    _submit(engine, req, "tenant-a", [], "fp", False)
    _submit(engine, req, "tenant-b", [], "fp", False)
    assert engine.cancelled == [("tenant", "tenant-a")]
    stopped.discard("tenant:tenant-a")
    _submit(engine, req, "tenant-a", [], "fp", False)
    assert len(engine.cancelled) == 1


def test_recently_stopped_forgets_after_its_ttl():
    rs = RecentlyStopped(ttl_s=0.0)
    rs.add("key:x")
    assert "key:x" not in rs
    rs = RecentlyStopped()
    rs.add("key:x")
    assert "key:x" in rs and "key:y" not in rs
