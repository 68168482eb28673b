"""Two API replicas of one distributed deployment (one PostgreSQL, one Redis): revoking a key or
suspending a tenant through replica 1 ends the requests that replica 2 already holds, queued for
its batch or decoding (app/tenancy/stop_broadcast.py: Redis pub/sub). The single-replica test, whose
streams and checks this mirrors, is tests/integration/test_revoke_inflight.py.

Replica 1 is the session's `distributed_service`; replica 2 is a second API process on the same
environment with batch size 1, so that several long streams wait behind one another there. Without
the broadcast, replica 2's queued streams would run to a normal completion.
"""

from __future__ import annotations

import time

import pytest

from app.tenancy.stop_broadcast import channel_for
from tests.integration.conftest import ServiceProcess
from tests.integration.test_inference import BASE
from tests.integration.test_revoke_inflight import Stream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replicas(distributed_service, tmp_path_factory):
    import redis

    r1 = distributed_service
    r1.wait_ready()  # replica 1 has registered the base: replica 2 starts on a settled database
    data_dir = tmp_path_factory.mktemp("replica2") / "data"
    data_dir.mkdir()
    env = dict(r1.env, DATA_DIR=str(data_dir), MAX_BATCH_SIZE="1", BATCH_WINDOW_MS="1")
    r2 = ServiceProcess(env, data_dir, "distributed").start()
    try:
        r2.wait_ready()
        # both replicas listen on the deployment's stop channel before anything is revoked
        client = redis.Redis.from_url(env["REDIS_URL"])
        channel = channel_for(env["REDIS_URL"])
        deadline = time.monotonic() + 60
        while client.pubsub_numsub(channel)[0][1] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.pubsub_numsub(channel)[0][1] >= 2, r2.log()
        client.close()
        yield r1, r2
    finally:
        r2.stop()


def _start_streams(svc, keys: list[str]) -> list[Stream]:
    streams = [Stream(svc, k) for k in keys]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60) and s.status == 200, s.status
    return streams


def test_a_key_revoked_on_one_replica_stops_its_requests_on_another(replicas):
    r1, r2 = replicas
    t = r1.make_tenant()
    r = r1.admin.post(f"/v1/admin/tenants/{t.id}/keys")
    assert r.status_code == 201, r.text
    k2 = r.json()["api_key"]

    *streams, other = _start_streams(r2, [t.key] * 4 + [k2])
    state = [(s.tokens, s.completed) for s in streams]
    queued = [s for s in streams if s.tokens == 0]
    running = [s for s in streams if s.tokens and not s.completed]
    assert len(queued) >= 2, f"the requests ran before the revocation: nothing left to test {state}"

    r = r1.admin.delete(f"/v1/admin/tenants/{t.id}/keys/{t.key_id}")  # replica 1, not replica 2
    assert r.status_code == 200, r.text
    r = r2.client(t.key).post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text

    for s in streams + [other]:
        s.join(120)
        assert not s.is_alive()
    ended = [(s.tokens, s.choices_finished, s.error and s.error["code"]) for s in streams]
    for s in queued:  # queued on replica 2 at the revocation: the error event, never a completion
        assert s.error is not None and not s.completed, (state, ended)
        assert s.error["code"] == "request_cancelled" and "revoked" in s.error["message"], s.error
    for s in running:  # running: cut short, unless its last row finished meanwhile
        assert (s.error is not None) != s.completed, (state, ended)
    # the tenant's other key is untouched on replica 2
    assert other.completed and other.error is None, other.error
    r = r2.client(k2).post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_a_tenant_suspended_on_one_replica_stops_on_another_and_resumes(replicas):
    r1, r2 = replicas
    t = r1.make_tenant()
    streams = _start_streams(r2, [t.key] * 3)
    state = [(s.tokens, s.completed) for s in streams]
    queued = [s for s in streams if s.tokens == 0]
    assert queued, f"the requests ran before the suspension: nothing left to test {state}"

    r = r1.admin.patch(f"/v1/admin/tenants/{t.id}", json={"suspended": True})
    assert r.status_code == 200, r.text
    for s in streams:
        s.join(120)
        assert not s.is_alive()
    for s in queued:
        assert s.error is not None and not s.completed, s.error
        assert s.error["code"] == "request_cancelled" and "suspended" in s.error["message"], s.error

    # unsuspended on replica 1: replica 2 forgets the suspension too (else the route would cancel
    # the tenant's new requests there). The message may still be on its way: poll briefly.
    r = r1.admin.patch(f"/v1/admin/tenants/{t.id}", json={"suspended": False})
    assert r.status_code == 200, r.text
    body = {"model": BASE, "prompt": "hi", "max_tokens": 1}
    deadline = time.monotonic() + 30
    while True:
        r = r2.client(t.key).post("/v1/completions", json=body)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 403 and r.json()["error"]["code"] == "request_cancelled", r.text
        time.sleep(0.2)
    assert r.status_code == 200, r.text
