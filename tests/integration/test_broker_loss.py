"""A broker that loses a job's message, on real processes: a Redis of the test's own (another port,
no persistence: never the machine's shared Redis), an API and a Celery worker pointed at it. The
job is created while Redis is down, and Redis comes back empty: the job must run within seconds
(the outbox's relay), not after the monitor's re-send of forgotten jobs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port
from tests.integration.test_jobs import JOB_ENV, rows, small, upload, wait_status

pytestmark = pytest.mark.integration


class RedisServer:
    def __init__(self, port: int, log_path: Path):
        self.port, self.log_path = port, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # no persistence: it comes back empty
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port(), tmp_path / "redis.log").start()
    yield server
    server.stop()


def test_a_job_created_while_redis_is_down_runs_within_seconds_of_its_return_empty(start_service, own_redis):
    svc = start_service("embedded", env={**JOB_ENV, "REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0"},
                        worker=True)
    t = svc.make_tenant()
    base = None
    deadline = time.monotonic() + 60
    while base is None:
        assert time.monotonic() < deadline
        ids = [m["id"] for m in t.client.get("/v1/models").json().get("data", []) if not m["id"].startswith("ft:")]
        base = ids[0] if ids else time.sleep(0.2)
    fid = upload(t.client, rows(20))

    own_redis.stop()
    t0 = time.monotonic()
    r = t.client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": fid, "method": small()})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and time.monotonic() - t0 < 3  # answered at once, the job committed
    # the API's relay tried and failed: the message exists nowhere but in the outbox
    deadline = time.monotonic() + 10
    while f"could not send job {job['id']}" not in svc.log(200):
        assert time.monotonic() < deadline, svc.log()
        time.sleep(0.1)

    own_redis.start()  # empty
    back = time.monotonic()
    running = wait_status(t.client, job["id"], {"running", "succeeded"}, timeout=45)
    picked_up = time.monotonic() - back
    done = wait_status(t.client, job["id"], {"succeeded"}, timeout=60)
    assert done["fine_tuned_model"], done
    # seconds (the worker reconnects, a monitor pass relays), not JOB_RESEND_AFTER_S (60 s)
    assert picked_up < 20, (picked_up, running, svc.workers[0].log())
