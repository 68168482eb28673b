"""schemathesis against the live OpenAPI spec of a running service (its own process, no worker).

Every operation, authenticated (a tenant key on tenant routes, the admin key on `/v1/admin/*`),
at most 10 generated cases per operation, in three slices:
- `real`: positive data whose path parameters (and body `model`/`training_file`/`file`) name
  real resources of the fuzzing tenant, so the handlers run past their 404s;
- `positive`: schema-valid data as generated (ids are random, so mostly 404s);
- `negative`: schema-violating data (must be a 4xx, never a 5xx).
Checks: no 5xx, every response conforms to the schema declared for its status, and every status
is one the spec declares.

No real training happens: there is no worker (generated jobs stay queued). The service waits for
the served base first, so `/readyz` answers 200. The run takes about a minute on 2 CPUs.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.integration.conftest import launch

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
MAX_EXAMPLES = 10  # per operation, all slices together
BUDGET_S = 170  # the generation loop; setup (bases, service start) comes on top
GOOD_JSONL = "".join(json.dumps({"prompt": f"item {i} ->", "completion": " ok"}) + "\n" for i in range(8))


def _peft_zip(base_dir: str, P: int, seed: int) -> bytes:
    from transformers import AutoConfig

    from app.ml.adapter import Adapter, export_peft_zip
    from app.ml.kvcache import ModelGeometry
    from app.ml.prefix import PrefixConfig

    g = ModelGeometry.of(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    table = torch.randn(P, cfg.table_width, generator=torch.Generator().manual_seed(seed))
    return export_peft_zip(Adapter.from_table(table, cfg, "set-by-import"))


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory, tiny_base_dirs):
    s = launch(tmp_path_factory.mktemp("schemathesis"), "embedded", tiny_base_dirs["gpt2"], None,
               {"MAX_COMPLETION_TOKENS": "8", "MAX_N": "2"})
    try:
        s.wait_ready()
        t = s.tenant = s.make_tenant("fuzz")
        victim = s.make_tenant("fuzz-admin-target")  # what admin path parameters name (it may get deleted)
        base = next(m["id"] for m in t.client.get("/v1/models").json()["data"] if m["kind"] == "base")
        r = t.client.post("/v1/files", files={"file": ("d.jsonl", GOOD_JSONL.encode(), "application/jsonl")},
                          data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        fid = r.json()["id"]
        deadline = time.monotonic() + 30
        while t.client.get(f"/v1/files/{fid}").json()["status"] == "uploaded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s.zip = _peft_zip(tiny_base_dirs["gpt2"], 4, 0)
        adapters = []
        for _ in range(2):  # one named by path parameters (it may get deleted), one by bodies
            r = t.client.post("/v1/models/import", files={"file": ("a.zip", s.zip, "application/zip")})
            assert r.status_code == 201, r.text
            adapters.append(r.json()["id"])
        r = t.client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": fid})
        assert r.status_code == 200, r.text
        s.real_path = {"file_id": fid, "fine_tuning_job_id": r.json()["id"], "model_id": adapters[0],
                       "tenant_id": victim.id, "key_id": victim.key_id}
        s.real_body = {"base": base, "adapter": adapters[1], "file": fid}
        yield s
    finally:
        s.stop()


def _realise(case, op, svc) -> None:
    """Point the body of a generated case at real resources."""
    body, real = case.body, svc.real_body
    if not isinstance(body, dict):
        return
    if op.path in ("/v1/completions", "/v1/classify"):
        body["model"] = real["adapter"]
    elif op.path in ("/v1/chat/completions", "/v1/fine_tuning/jobs", "/v1/admin/serving"):
        body["model"] = real["base"]
    if op.path in ("/v1/completions", "/v1/chat/completions"):  # mostly within the server's limits
        from app.api.completions import ChatCompletionCreate, CompletionCreate

        known = (CompletionCreate if op.path == "/v1/completions" else ChatCompletionCreate).model_fields
        for name in [k for k in body if k not in known]:  # extras are 400s by design; those ran already
            del body[name]
        if op.path == "/v1/completions" and body.get("max_tokens") is None:
            body["max_tokens"] = 4  # the default (16) is over this service's MAX_COMPLETION_TOKENS
        for name, top in (("max_tokens", 9), ("max_completion_tokens", 9), ("n", 3), ("best_of", 3)):
            v = body.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                body[name] = int(v) % top or (1 if name in ("n", "best_of") else 0)
    if op.path == "/v1/fine_tuning/jobs":
        body["training_file"] = real["file"]
    if op.path == "/v1/models/import" and "file" in body:
        body["file"] = svc.zip


def _run(op, mode, examples: int, svc, real: bool, seen: dict) -> list[str]:
    """Up to `examples` cases of one operation; the failures found (no shrinking: it costs time)."""
    key = svc.admin_key if op.path.startswith("/v1/admin") else svc.tenant.key
    label = f"{op.method.upper()} {op.path} [{'real' if real else mode.value}]"
    failures: list[str] = []
    kw = {}
    if real:
        names = re.findall(r"\{(\w+)", op.path)
        if any(n not in svc.real_path for n in names):  # no real resource of that kind (an eval's run)
            return []
        kw["path_parameters"] = {n: svc.real_path[n] for n in names}

    @given(case=op.as_strategy(generation_mode=mode, **kw))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        if real:
            _realise(case, op, svc)
        try:
            r = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=30)
            seen.setdefault(label, set()).add(r.status_code)
        except Exception as e:  # noqa: BLE001 - collected, reported together
            seen.setdefault(label, set()).add("FAIL")
            failures.append(f"{label}: {str(e)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to break (e.g. /healthz)
        assert mode is GenerationMode.NEGATIVE, label
    return failures


def test_schemathesis_live_spec(fuzz_service):
    svc = fuzz_service
    schema = schemathesis.openapi.from_url(svc.base_url + "/openapi.json")
    schema.config.update(base_url=svc.base_url)
    # deletions last, so that the other operations still find the real resources
    ops = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: op.method.upper() == "DELETE")
    assert len(ops) >= 30
    failures: list[str] = []
    seen: dict[str, set] = {}
    started = time.monotonic()
    for op in ops:
        has_inputs = "{" in op.path or op.method.upper() in ("POST", "PATCH", "PUT")
        plan = [(GenerationMode.POSITIVE, 4, True), (GenerationMode.POSITIVE, 3, False),
                (GenerationMode.NEGATIVE, 3, False)] if has_inputs else \
               [(GenerationMode.POSITIVE, 5, False), (GenerationMode.NEGATIVE, 5, False)]
        assert sum(n for _, n, _ in plan) <= MAX_EXAMPLES
        for mode, n, real in plan:
            failures += _run(op, mode, n, svc, real, seen)
        assert time.monotonic() - started < BUDGET_S, f"over the time budget at {op.path}"
    assert svc.alive()
    report = "\n".join(f"  {k}: {sorted(map(str, v))}" for k, v in seen.items())
    print("statuses seen:\n" + report)
    assert len(seen) >= 2 * len(ops), report  # the run really reached every operation
    # the real slice gets past the 404s somewhere: the handlers themselves were exercised
    for label in ("GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events [real]", "POST /v1/models/import [real]",
                  "GET /v1/models/{model_id}/export [real]"):
        assert seen[label] & {200, 201}, report
    inference = set().union(*(seen[f"POST {p} [real]"] for p in ("/v1/completions", "/v1/chat/completions",
                                                                    "/v1/classify")))
    assert 200 in inference, report  # generation itself ran on fuzzed parameters
    assert not failures, f"{len(failures)} failing cases:\n" + "\n\n".join(failures)
