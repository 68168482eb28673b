"""The defaults, end to end: `{"type": "prefix"}` and nothing else, through the real service.

    python -m bench.defaults_http [--quick] [--base DIR]

What `bench.defaults` measures in-process, done the way a user does it: starts `python -m app.run`
(the API and one Celery worker, embedded mode, a fresh DATA_DIR, each process with TORCH_THREADS=1
as `make run` has it) serving the `default` base (`--base`, else ./var/bench/default as
`bench.defaults` builds it), creates a tenant, uploads the training pairs as JSONL, creates a job
whose `method` is `{"type": "prefix"}`, waits for it, and then sends the unseen prompts to
`/v1/completions` at temperature 0 with the fine-tuned model and with the base alone.

Last line: JSON with em_prefix, em_base (exact match on the unseen prompts with unseen adjectives),
em_prefix_combos, em_base_combos (unseen prompts made of training words), job_seconds (created
to succeeded, the issue's "within 10 minutes on 2 cores"), trained_tokens, resolved
hyperparameters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import emit, log
from bench.defaults import REPO, make_task
from bench.serving import _free_port, wait_ready


def _start(base: Path, data_dir: Path, port: int, admin: str) -> subprocess.Popen:
    env = dict(os.environ, DATA_DIR=str(data_dir), BASE_MODEL=str(base), ADMIN_API_KEY=admin, PORT=str(port),
               TORCH_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log_file = open(data_dir / "service.log", "w")
    return subprocess.Popen([sys.executable, "-m", "app.run"], cwd=REPO, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


async def _exact_match(url: str, key: str, model: str, examples) -> float:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
        async def one(e):
            r = await c.post("/v1/completions", json={"model": model, "prompt": e.prompt, "max_tokens": 4,
                                                      "temperature": 0})
            r.raise_for_status()
            return r.json()["choices"][0]["text"].strip() == e.completion.strip()
        ok = await asyncio.gather(*(one(e) for e in examples))
    return sum(ok) / max(1, len(ok))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", default=str(REPO / "var" / "bench" / "default"))
    args = ap.parse_args(argv)
    base = Path(args.base)
    if not (base / "config.json").is_file():
        raise SystemExit(f"no base at {base}: run `python -m bench.defaults` first (it builds one)")
    n_train, n_eval = (200, 60) if args.quick else (360, 150)
    task = make_task(n_train, n_eval)

    with tempfile.TemporaryDirectory(prefix="bench-defaults-http-") as tmp:
        data_dir, port, admin = Path(tmp), _free_port(), "sk-admin-bench"
        url = f"http://127.0.0.1:{port}"
        proc = _start(base, data_dir, port, admin)
        try:
            wait_ready(url, proc, hint=f"see {data_dir / 'service.log'}")
            t = httpx.post(f"{url}/v1/admin/tenants", json={"name": "defaults"},
                           headers={"Authorization": f"Bearer {admin}"}, timeout=30).json()
            c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {t['api_key']}"}, timeout=60)
            jsonl = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in task["train"])
            f = c.post(
                "/v1/files", files={"file": ("train.jsonl", jsonl.encode())}, data={"purpose": "fine-tune"}
            ).json()
            base_id = c.get("/v1/models").json()["data"][0]["id"]
            t0 = time.monotonic()
            job = c.post(
                "/v1/fine_tuning/jobs", json={"model": base_id, "training_file": f["id"], "method": {"type": "prefix"}}
            ).json()
            log(f"job {job['id']} created")
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(2)
                job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            job_s = time.monotonic() - t0
            if job["status"] != "succeeded":
                raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
            log(f"job succeeded in {job_s:.0f} s; evaluating {len(task['held'])} unseen prompts")
            out = {
                "em_base": asyncio.run(_exact_match(url, t["api_key"], base_id, task["held"])),
                "em_prefix": asyncio.run(_exact_match(url, t["api_key"], job["fine_tuned_model"], task["held"])),
                "em_base_combos": asyncio.run(_exact_match(url, t["api_key"], base_id, task["combos"])),
                "em_prefix_combos": asyncio.run(
                    _exact_match(url, t["api_key"], job["fine_tuned_model"], task["combos"])
                ),
                "job_seconds": round(job_s, 1),
                "trained_tokens": job.get("trained_tokens"),
                "hyperparameters": job.get("hyperparameters"),
                "train_pairs": len(task["train"]),
                "held_prompts": len(task["held"]),
                "base": str(base),
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    emit(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
