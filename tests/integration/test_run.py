"""`python -m app.run` (what `make run` starts): API + worker, generated admin key, Ctrl-C stops both."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import ROOT, _SCRUB, free_port

pytestmark = pytest.mark.integration


def run_and_stop(tmp_path, tiny_base_dirs, args: list[str], worker: bool) -> None:
    port = free_port()
    data = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(DATA_DIR=str(data), PORT=str(port), BASE_MODEL=tiny_base_dirs["gpt2"], SERVING_ENABLED="0",
               PYTHONUNBUFFERED="1")
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_starts_api_and_worker_and_stops_on_sigint(tmp_path, tiny_base_dirs):
    if not (ROOT / "worker" / "celery_app.py").is_file():
        pytest.skip("no worker yet")
    run_and_stop(tmp_path, tiny_base_dirs, [], worker=True)
