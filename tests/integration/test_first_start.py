"""First start with no BASE_MODEL and an empty DATA_DIR: the API builds the engine's `default` base
offline (stdlib corpus, BPE, a few training steps thanks to DEFAULT_BASE_BUILD_STEPS), answers
/readyz 503 until it is loaded, then serves it."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.integration.conftest import launch

pytestmark = pytest.mark.integration

BUILD_STEPS = 3


def test_first_start_builds_the_default_base_then_serves_it(tmp_path):
    t0 = time.monotonic()
    svc = launch(tmp_path, "embedded", None, None, {"DEFAULT_BASE_BUILD_STEPS": str(BUILD_STEPS)})
    try:
        assert "BASE_MODEL" not in svc.env
        # the build takes seconds (corpus, BPE, packing); the API is up but not ready meanwhile
        r = httpx.get(svc.base_url + "/readyz", timeout=5)
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "not_ready" and r.json()["checks"]["database"] == "ok"
        not_ready_seen = 1
        deadline = time.monotonic() + 120
        while (r := httpx.get(svc.base_url + "/readyz", timeout=5)).status_code != 200:
            assert r.status_code == 503, r.text
            assert svc.alive() and time.monotonic() < deadline, svc.log()
            not_ready_seen += 1
            time.sleep(0.3)
        assert r.json()["status"] == "ready" and not_ready_seen > 1
        meta = json.loads((svc.data_dir / "models" / "default" / "base_meta.json").read_text())
        assert meta["steps"] == meta["planned_steps"] == BUILD_STEPS
        assert meta["corpus"]["name"] == "python-stdlib-docs"
        assert not (svc.data_dir / "models" / ".default-build").exists()  # its checkpoints, removed once built

        t = svc.make_tenant()
        models = t.client.get("/v1/models").json()["data"]
        assert "default" in [m["id"] for m in models]
        r = t.client.post("/v1/completions", json={"model": "default", "prompt": "Return the", "max_tokens": 4,
                                                   "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert 1 <= body["usage"]["completion_tokens"] <= 4
    finally:
        svc.stop()
    assert time.monotonic() - t0 < 120
