"""One tenant's bad request fails only its own row of the shared decode batch, over real HTTP.

Tenant B keeps six greedy completions decoding while tenant A sends, into the same batch, a
temperature that rounds to 0 in float32, a top_p below the bound, and a completion through an
imported adapter whose finite values make its logits NaN. B's six texts must equal those it gets
with nobody else on the server."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.integration.test_isolation import peft_zip

pytestmark = pytest.mark.integration

B_PROMPTS = ["alpha", "the quick brown", "zebra 42", "name: Aromi |", "hello world", "x y z"]
B_TOKENS = 120


def hostile_zip(base_dir: str) -> bytes:
    """A PEFT prefix of finite values (so the import takes it) whose keys overflow q·k: NaN logits."""
    from transformers import AutoConfig

    from app.ml.adapter import Adapter, export_peft_zip
    from app.ml.kvcache import ModelGeometry
    from app.ml.prefix import PrefixConfig

    g = ModelGeometry.of(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=2)
    return export_peft_zip(Adapter.from_table(torch.full((2, cfg.table_width), 3e38), cfg, "set-by-import"))


def b_texts(client, base: str) -> tuple[list[str], float]:
    """B's six completions, sent at once; (texts, time the last one finished)."""
    texts: list[str | None] = [None] * len(B_PROMPTS)

    def one(i):
        r = client.post("/v1/completions", json={"model": base, "prompt": B_PROMPTS[i], "max_tokens": B_TOKENS,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        texts[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(B_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts, time.monotonic()


@pytest.fixture
def svc(embedded_service):
    embedded_service.wait_ready()
    return embedded_service


def test_a_tenants_bad_rows_fail_alone_and_b_keeps_every_token(svc, tiny_base_dirs):
    a, b = svc.make_tenant(), svc.make_tenant()
    base = next(m["id"] for m in b.client.get("/v1/models").json()["data"] if m["kind"] == "base" and m["served"])
    r = a.client.post(
        "/v1/models/import", files={"file": ("h.zip", hostile_zip(tiny_base_dirs["gpt2"]), "application/zip")}
    )
    assert r.status_code == 201, r.text
    hostile = r.json()["id"]
    r = a.client.post(
        "/v1/models/import", files={"file": ("p.zip", peft_zip(tiny_base_dirs["gpt2"], 4, 1), "application/zip")}
    )
    assert r.status_code == 201, r.text
    fine = r.json()["id"]

    alone, _ = b_texts(b.client, base)
    assert len(set(alone)) > 1 and all(alone)
    # load A's adapters into the cache now, so that below their rows join B's batch at once
    for model in (hostile, fine):
        a.client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1, "temperature": 0})

    answers: dict[str, tuple[int, dict, float]] = {}

    def a_sends():
        time.sleep(0.1)  # B's rows are decoding by now
        for name, body in {
            # first: its answer time shows it shared the batch with B's rows, even on a loaded machine
            "nan_adapter": {"model": hostile, "prompt": "x", "max_tokens": 5, "temperature": 0},
            "tiny_temperature": {"model": base, "prompt": "x", "max_tokens": 5, "temperature": 1e-300},
            "tiny_top_p": {"model": base, "prompt": "x", "max_tokens": 5, "top_p": 1e-9},
            "nan_adapter_sampled": {"model": hostile, "prompt": "x", "max_tokens": 5, "temperature": 0.7, "seed": 1},
            "fine_adapter": {"model": fine, "prompt": "x", "max_tokens": 5, "temperature": 0},
        }.items():
            r = a.client.post("/v1/completions", json=body)
            answers[name] = (r.status_code, r.json(), time.monotonic())

    attacker = threading.Thread(target=a_sends)
    attacker.start()
    together, b_done = b_texts(b.client, base)
    attacker.join()

    assert together == alone  # not one token of B's changed
    status, body, _ = answers["tiny_temperature"]
    assert status == 200, body  # a temperature under 1e-5 decodes greedily
    status, body, _ = answers["tiny_top_p"]
    assert status == 400 and body["error"]["param"] == "top_p", body
    for name in ("nan_adapter", "nan_adapter_sampled"):
        status, body, _ = answers[name]
        assert status == 500, body
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "generation_failed", body
        assert "not finite" in body["error"]["message"]
    assert answers["fine_adapter"][0] == 200
    # A's faulty rows really shared the batch with B's: they were answered while B still decoded
    assert answers["nan_adapter"][2] < b_done


def test_a_streamed_row_that_fails_ends_with_the_error_event(svc, tiny_base_dirs):
    a = svc.make_tenant()
    r = a.client.post(
        "/v1/models/import", files={"file": ("h.zip", hostile_zip(tiny_base_dirs["gpt2"]), "application/zip")}
    )
    assert r.status_code == 201, r.text
    with a.client.stream(
        "POST", "/v1/completions", json={"model": r.json()["id"], "prompt": "x", "max_tokens": 5, "stream": True}
    ) as resp:
        text = "".join(resp.iter_text())
    assert '"code":"generation_failed"' in text and text.rstrip().endswith("data: [DONE]")
