"""A revoked key stops at once over HTTP, including on its requests already queued or running for
a batch (the engine-level test is tests/serving/test_engine_fake.py::test_cancel_key_...).

Streams make "already queued" observable: a streaming response's headers are sent once the
request is in the engine, and a stream that has sent no token has not started. With batch size 1,
several long completions of key K1 (4 choices x 200 tokens) wait behind one another; K1 is revoked
through the admin API; every K1 stream that was waiting must end with the error event
(`request_cancelled`), never a normal completion, and the one running is cut short (unless its last
row finished while the revocation ran). New requests with K1 get 401. The tenant's other key K2 is
untouched: its queued stream completes, and it can send more.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.integration.test_inference import BASE

pytestmark = pytest.mark.integration

N_K1 = 5
# each request is N_CHOICES rows of MAX_TOKENS; at batch size 1 the rows run one after another, so a
# request that has not started when the key is revoked cannot finish within the revocation call
N_CHOICES = 4
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def slow_svc(tmp_path_factory, tiny_base_dirs):
    from tests.integration.conftest import launch

    s = launch(tmp_path_factory.mktemp("revoke"), "embedded", tiny_base_dirs["gpt2"], None,
               env={"MAX_BATCH_SIZE": "1", "BATCH_WINDOW_MS": "1"})
    s.wait_ready()
    yield s
    s.stop()


class Stream(threading.Thread):
    """One streaming completion of N_CHOICES choices; records when its headers came, its chunks
    and how it ended."""

    def __init__(self, svc, key: str):
        super().__init__(daemon=True)
        self.client = svc.client(key, timeout=120)
        self.started = threading.Event()  # headers received: the request is in the engine
        self.tokens = 0
        self.choices_finished = 0  # choices that sent their finish_reason
        self.error: dict | None = None
        self.status: int | None = None

    @property
    def completed(self) -> bool:
        """A normal completion: every choice finished."""
        return self.choices_finished == N_CHOICES

    def run(self) -> None:
        body = {"model": BASE, "prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "n": N_CHOICES,
                "temperature": 0, "stream": True}
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            self.status = r.status_code
            self.started.set()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    self.error = event["error"]
                    continue
                for choice in event["choices"]:
                    if choice.get("finish_reason"):
                        self.choices_finished += 1
                    elif choice.get("text"):
                        self.tokens += 1


def test_revoked_key_stops_its_queued_and_running_requests(slow_svc):
    svc = slow_svc
    t = svc.make_tenant()
    r = svc.admin.post(f"/v1/admin/tenants/{t.id}/keys")
    assert r.status_code == 201, r.text
    k2 = r.json()["api_key"]

    streams = [Stream(svc, t.key) for _ in range(N_K1)]
    other = Stream(svc, k2)
    for s in streams + [other]:
        s.start()
    for s in streams + [other]:
        assert s.started.wait(60) and s.status == 200, s.status
    # every request is in the engine now; batch size 1 runs their rows one after another
    state = [(s.tokens, s.completed) for s in streams]
    queued = [s for s in streams if s.tokens == 0]  # not one row started yet: surely still waiting
    running = [s for s in streams if s.tokens and not s.completed]
    assert len(queued) >= 2, f"the requests ran before the revocation: nothing left to test {state}"

    r = svc.admin.delete(f"/v1/admin/tenants/{t.id}/keys/{t.key_id}")
    assert r.status_code == 200, r.text
    revoked_at = time.monotonic()

    # a new request with K1 is refused at once
    r = svc.client(t.key).post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text

    for s in streams + [other]:
        s.join(120)
        assert not s.is_alive()
    # cancelled at once: the queued ones did not wait for the rows ahead of them to run
    assert time.monotonic() - revoked_at < 20
    ended = [(s.tokens, s.choices_finished, s.error and s.error["code"]) for s in streams]
    for s in queued:  # queued at revocation: the error event, never a normal completion
        assert s.error is not None and not s.completed, (state, ended)
        assert s.error["code"] == "request_cancelled" and "revoked" in s.error["message"], s.error
    for s in running:  # running: cut short, unless its last row finished while the revocation ran
        assert (s.error is not None) != s.completed, (state, ended)

    # K2 of the same tenant is untouched: its queued stream completed and it can send more
    assert other.completed and other.error is None, other.error
    r = svc.client(k2).post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
