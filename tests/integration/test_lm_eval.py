"""lm-evaluation-harness runs against the server, as a user runs it: `lm_eval --model
local-completions` over HTTP, offline, from a local task YAML over local JSONL. Its loglikelihood
requests are `echo` + `logprobs` completions with `max_tokens` 1; its `acc` must equal the accuracy
that our own scorer (`/v1/classify`, summed log-probabilities) gives on the same items and adapter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT
from tests.integration.test_isolation import peft_zip

pytestmark = pytest.mark.integration

ANIMALS = ["cat", "dog", "fox", "owl", "cow"]
ITEMS = [{"question": f"Question {i}: which animal comes {word}?", "choices": ANIMALS, "label": i % len(ANIMALS)}
         for i, word in enumerate("first second third fourth fifth sixth seventh eighth ninth tenth "
                                  "next last early late small big red blue green grey".split())]

TASKS = """\
task: prefixd_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """\
task: prefixd_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


def run_lm_eval(tmp_path, svc, key: str, model: str, tokenizer_dir: str, tasks: list[str]) -> dict:
    """One lm_eval run of `tasks` (one process: its imports cost more than the tasks here)."""
    out = tmp_path / "out"
    env = {**os.environ, "OPENAI_API_KEY": key, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    args = ",".join([f"base_url={svc.base_url}/v1/completions", f"model={model}", "tokenizer_backend=huggingface",
                     f"tokenizer={tokenizer_dir}", "num_concurrent=1", "max_retries=1", "timeout=60"])
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                           "--model_args", args, "--tasks", ",".join(tasks), "--include_path", str(tmp_path / "tasks"),
                           "--output_path", str(out), "--seed", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = list(out.rglob("results_*.json"))
    return json.loads(result.read_text())["results"]


def test_lm_eval_multiple_choice_and_generation_against_the_server(embedded_service, tiny_base_dirs, tmp_path):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (the dev extra)")
    svc = embedded_service
    svc.wait_ready()
    tenant = svc.make_tenant()
    r = tenant.client.post("/v1/models/import", files={"file": ("a.zip", peft_zip(tiny_base_dirs["gpt2"], 4, 3),
                                                                 "application/zip")})
    assert r.status_code == 201, r.text
    adapter = r.json()["id"]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASKS.format(data=data))
    (tmp_path / "tasks" / "gen.yaml").write_text(GEN_TASK.format(data=data))

    results = run_lm_eval(tmp_path, svc, tenant.key, adapter, tiny_base_dirs["gpt2"], ["prefixd_mc", "prefixd_gen"])
    mc, gen = results["prefixd_mc"], results["prefixd_gen"]
    # our scorer on the same items and adapter: lm-eval joins question and choice with a space
    right = 0
    for item in ITEMS:
        r = tenant.client.post("/v1/classify", json={"model": adapter, "input": item["question"],
                                                     "labels": [" " + c for c in item["choices"]]})
        assert r.status_code == 200, r.text
        scores = [d["logprob"] for d in r.json()["data"]]
        right += scores.index(max(scores)) == item["label"]
    assert mc["acc,none"] == pytest.approx(right / len(ITEMS))

    assert 0.0 <= gen["exact_match,none"] <= 1.0


def test_echo_returns_the_prompt_and_its_logprobs_first(embedded_service):
    svc = embedded_service
    svc.wait_ready()
    tenant = svc.make_tenant()
    base = next(m["id"] for m in tenant.client.get("/v1/models").json()["data"] if m["kind"] == "base" and m["served"])

    def complete(**body):
        return tenant.client.post("/v1/completions", json={"model": base, "temperature": 0, **body})

    r = complete(prompt="the quick brown fox", max_tokens=0, echo=True, logprobs=2)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "the quick brown fox"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == "the quick brown fox" and lp["text_offset"][0] == 0
    # lm-eval's exact request: token ids, one generated token after the echoed prompt
    r = complete(prompt=[[5, 6, 7, 8]], max_tokens=1, logprobs=1, seed=1234, echo=True)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 5 and lp["token_logprobs"][0] is None
    assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
    # without echo the same request gives the generated token alone, with the same logprob
    alone = complete(prompt=[5, 6, 7, 8], max_tokens=1, logprobs=1)
    assert alone.json()["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(lp["token_logprobs"][-1],
                                                                                           abs=1e-4)
    for bad in ({"n": 2}, {"stream": True}):
        r = complete(prompt="x", max_tokens=1, echo=True, **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
