"""The six task recipes end to end over HTTP: each `python -m recipes.<name>` runs as a user runs
it, against one real API process with a Celery worker (tests/integration/conftest.py), serving
the tiny GPT-2 base. Each converts its real data (/work/shared/data, or $PREFIXD_DATA_ROOT),
uploads 16 rows, trains a prefix for one epoch (2 steps), and evaluates the adapter and the base
on 8 items; the test reads the JSON last line. The six run at once (the worker takes the jobs one
by one, the server batches the evaluation requests). The scores of a 2-step adapter on a random
base mean nothing; that the keys are there and the numbers are in range is what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from recipes import NAMES
from recipes.common import RecipeError, data_root
from tests.integration.conftest import ROOT, launch

pytestmark = pytest.mark.integration

METRICS = {
    "sst2": {"accuracy"},
    "trec": {"accuracy", "macro_f1"},
    "qasrl": {"f1", "exact_match"},
    "multi30k": {"bleu", "chrf"},
    "e2e": {"bleu", "chrf", "rouge_l"},
    "wnut17": {"f1", "precision", "recall"},
}
# BLEU and chrF are sacrebleu's 0-100; the rest are 0-1
SCALE = {"bleu": 100.0, "chrf": 100.0}
TRAIN_ROWS, EVAL_ROWS = 16, 8


def _data_root() -> str:
    try:
        return str(data_root())
    except RecipeError as e:
        pytest.skip(str(e))


def _cmd(name: str, base_url: str, key: str, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"recipes.{name}", "--base-url", base_url, "--api-key", key, "--model", model,
            "--train-rows", str(TRAIN_ROWS), "--eval-rows", str(EVAL_ROWS), "--n-epochs", "1", "--max-tokens", "6",
            "--job-timeout", "120", *extra]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, tiny_base_dirs):
    """{name: CompletedProcess} of the six recipes, and of one refused run (an unknown model), all
    against one server."""
    root = _data_root()
    t0 = time.monotonic()
    svc = launch(tmp_path_factory.mktemp("recipes"), "embedded", tiny_base_dirs["gpt2"], None, worker=True)
    try:
        svc.wait_ready()
        tenant = svc.make_tenant()
        base = next(m["id"] for m in tenant.client.get("/v1/models").json()["data"] if not m["id"].startswith("ft:"))
        env = {**svc.env, "PREFIXD_DATA_ROOT": root}
        url = svc.base_url + "/v1"
        cmds = {name: _cmd(name, url, svc.make_tenant().key, base) for name in NAMES}
        cmds["unknown-model"] = _cmd("multi30k", url, tenant.key, "no-such-base")
        procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, c in cmds.items()}
        runs = {}
        for k, p in procs.items():
            out, err = p.communicate(timeout=180)
            runs[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        print(f"\nrecipes: server up and seven runs done in {time.monotonic() - t0:.1f} s")
        runs["_service"] = svc
        runs["_tenant"] = tenant
        yield runs
    finally:
        svc.stop()


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_end_to_end(recipe_runs, name):
    run = recipe_runs[name]
    assert run.returncode == 0, f"{name} exited {run.returncode}:\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["recipe"] == name
    assert result["adapter"].startswith("ft:") and result["job_id"].startswith("ftjob-")
    assert result["train_rows"] == TRAIN_ROWS
    # a prompt longer than the tiny base's 256 positions is left out, for both models alike
    assert result["eval_rows"] >= EVAL_ROWS // 2
    assert result["eval_rows"] + result["eval_dropped_too_long"] == EVAL_ROWS
    assert result["headline"] in METRICS[name]
    assert set(result["metrics"]) == {"adapter", "base"}
    for model, scores in result["metrics"].items():
        assert set(scores) == METRICS[name], (model, scores)
        for metric, value in scores.items():
            assert 0.0 <= value <= SCALE.get(metric, 1.0), (model, metric, value)
    assert len(result["examples"]["adapter"]) == 3 and len(result["examples"]["base"]) == 3
    # the table, before the JSON line, names every metric and both models
    table = run.stdout.strip().splitlines()[:-1]
    assert any("adapter" in line and "base" in line for line in table)
    for metric in METRICS[name]:
        assert any(line.startswith(metric) for line in table), (metric, table)
    # progress went to stderr, and the job really ran on the server
    assert "succeeded" in run.stderr
    job = httpx.get(f"{recipe_runs['_service'].base_url}/v1/models", timeout=10,
                    headers={"Authorization": f"Bearer {run.args[run.args.index('--api-key') + 1]}"}).json()
    assert result["adapter"] in [m["id"] for m in job["data"]]


def test_unknown_model_is_refused_before_any_upload(recipe_runs):
    run = recipe_runs["unknown-model"]
    assert run.returncode == 2, run.stderr
    assert "'no-such-base' is not served here" in run.stderr
    assert run.stdout == ""
    files = recipe_runs["_tenant"].client.get("/v1/files").json()["data"]
    assert files == []


def test_data_root_is_checked(tmp_path):
    missing = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, "-m", "recipes.sst2", "--api-key", "k", "--base-url", "http://127.0.0.1:9/v1"],
                       cwd=ROOT, env={**os.environ, "PREFIXD_DATA_ROOT": str(missing)}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert f"data root {missing} is not a directory" in r.stderr and "PREFIXD_DATA_ROOT" in r.stderr
