"""`python -m app.run` (what `make run` starts): API + worker, generated admin key, a killed worker
restarted by the supervisor (its job resumes), Ctrl-C stops both."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import _SCRUB, ROOT, free_port
from tests.integration.test_jobs import rows, small, upload, wait_status

pytestmark = pytest.mark.integration

# a heartbeat timeout far beyond the test's deadlines: the killed worker's job must be requeued
# because the supervisor saw its worker exit, not because its heartbeat went stale
JOB_ENV = {"JOB_HEARTBEAT_S": "0.5", "JOB_STALE_AFTER_S": "600", "JOB_MONITOR_INTERVAL_S": "0.5"}


def run_and_stop(tmp_path, tiny_base_dirs, args: list[str], worker: bool, env_extra: dict | None = None,
                 during=None) -> None:
    """Start `python -m app.run`, check the admin key, call `during(base_url, admin_key, log_path)`,
    then SIGINT: exit 0 and nothing listening."""
    port = free_port()
    data = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(DATA_DIR=str(data), PORT=str(port), BASE_MODEL=tiny_base_dirs["gpt2"], SERVING_ENABLED="0",
               PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.run", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        up = False
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            if not up:
                try:
                    up = httpx.get(base + "/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    pass
            if up and (not worker or " ready." in log.read_text()):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"not started:\n{log.read_text()[-3000:]}")
        key_file = data / "admin_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key in log.read_text()  # printed once, at first start
        r = httpx.post(base + "/v1/admin/tenants", json={"name": "x"}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201
        if during is not None:
            during(base, key, log)
            assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_worker_mid_job(base: str, key: str, log: Path) -> None:
    """SIGKILL the worker after the job's first checkpoint: the supervisor starts a new worker (new
    pid, logged), the API answers throughout, and the job resumes from its checkpoint."""
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    tenant = admin.post("/v1/admin/tenants", json={"name": "run"}).json()
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tenant['api_key']}"}, timeout=30)
    deadline = time.monotonic() + 60
    while not (ids := [m["id"] for m in client.get("/v1/models").json()["data"] if not m["id"].startswith("ft:")]):
        assert time.monotonic() < deadline, "no base model listed"
        time.sleep(0.3)
    fid = upload(client, rows(40))
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": ids[0], "training_file": fid, "method": small(n_epochs=10, batch_size=4)}).json()
    deadline = time.monotonic() + 120
    while not client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]:
        assert time.monotonic() < deadline, client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        time.sleep(0.2)
    old_pid = int(re.findall(r"worker started \(pid (\d+)\)", log.read_text())[0])
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (new := re.findall(r"worker restarted \(pid (\d+)\)", log.read_text())):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200  # the API stays up
        time.sleep(0.2)
    assert int(new[0]) != old_pid
    assert "worker exited (-9); restarting in 1 s" in log.read_text()
    done = wait_status(client, job["id"], {"succeeded"}, timeout=180)
    msgs = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                             params={"limit": 100}).json()["data"]]
    assert any(m.startswith("Resuming from checkpoint") for m in msgs), msgs
    assert any(m.startswith("Worker lost; job requeued, resuming from step ") for m in msgs), msgs
    assert "held 1 running job(s)" in log.read_text()
    steps = [e["data"]["step"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                                   params={"limit": 100}).json()["data"] if e["type"] == "metrics"]
    assert len(steps) == len(set(steps)), steps  # the steps redone after the checkpoint are reported once
    assert done["fine_tuned_model"]
    admin.close()
    client.close()


def test_run_restarts_a_killed_worker_whose_job_resumes_and_stops_on_sigint(tmp_path, tiny_base_dirs):
    if not (ROOT / "worker" / "celery_app.py").is_file():
        pytest.skip("no worker yet")
    run_and_stop(tmp_path, tiny_base_dirs, [], worker=True, env_extra={**JOB_ENV, "SERVING_ENABLED": "1"},
                 during=kill_worker_mid_job)
