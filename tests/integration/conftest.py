"""THE integration harness: real uvicorn (and Celery worker) processes over real sockets.

Reuse it from any test under tests/integration:

    def test_x(embedded_service):                 # one shared API process per session (SQLite)
        tenant = embedded_service.make_tenant()   # -> TenantHandle(id, key, key_id, client)
        r = tenant.client.get("/v1/files")

    def test_y(start_service):                    # your own process, your own env
        svc = start_service("embedded", env={"MAX_UPLOAD_BYTES": "2000"}, worker=True)
        svc.admin.post(...)                       # httpx.Client with the admin key

    def test_z(distributed_service): ...          # PostgreSQL + Redis + S3 (moto), shared per session

Variants:
- `embedded`: DATA_DIR=tmp, SQLite, kombu `sqla+sqlite` broker, local blobs.
- `distributed`: a fresh PostgreSQL database `prefixd_test_<hex>` (dropped after), a Redis db index
  claimed for the run (flushed after), an S3 bucket on a moto ThreadedMotoServer. Skipped when
  PostgreSQL or Redis is not reachable.
- mixed (tests/integration/test_smoke_combinations.py): `embedded` plus
  `distributed_backends.env(db=..., broker=..., blobs=...)`, the env of the named backends only.
Every process gets DATA_DIR, ADMIN_API_KEY, BASE_MODEL (the tiny GPT-2 from tests/conftest.py),
one torch thread, and the variant's env. A worker (`worker=True` or `svc.start_worker()`) is
`celery -A worker.celery_app worker -Q gpu -c 1 --pool solo` with the same env.
Logs go to files next to DATA_DIR; a failed start raises with the log's tail.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_DSN = os.environ.get("PREFIXD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("PREFIXD_TEST_REDIS", "redis://127.0.0.1:6379")
# settings read from the environment that must not leak into a test service
_SCRUB = ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "S3_PREFIX", "ADMIN_API_KEY",
          "BASE_MODEL", "BASE_MODEL_ID", "DATA_DIR", "PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop_proc(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


@dataclass
class TenantHandle:
    id: str
    name: str
    key: str
    key_id: str
    client: httpx.Client


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, queue: str = "gpu", cmd_prefix: list[str] = ()):
        self.env, self.log_path, self.queue = env, log_path, queue
        self.cmd_prefix = list(cmd_prefix)  # e.g. nsenter into a mount namespace of the test's own
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        cmd = [
            *self.cmd_prefix,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            self.queue,
            "-c",
            "1",
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "-n",
            f"test-{uuid.uuid4().hex[:8]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if " ready." in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"worker not ready after {timeout}s:\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Hard kill (SIGKILL), e.g. to test recovery from a dead worker."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        _stop_proc(self.proc, timeout=20)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self, n: int = 60) -> str:
        return _tail(self.log_path, n)


class ServiceProcess:
    """One `uvicorn app.main:create_app --factory` process on a free port, plus optional workers."""

    def __init__(self, env: dict[str, str], data_dir: Path, variant: str = "embedded"):
        self.env = dict(env)
        self.data_dir = data_dir
        self.variant = variant
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = self.env["ADMIN_API_KEY"]
        self.log_path = data_dir.parent / f"{data_dir.name}-api.log"
        self.proc: subprocess.Popen | None = None
        self.workers: list[WorkerProcess] = []
        self._clients: list[httpx.Client] = []
        self.cmd_prefix: list[str] = []  # wraps the API's and the workers' command lines

    # -- processes --
    def start(self, timeout: float = 180.0) -> ServiceProcess:
        cmd = [
            *self.cmd_prefix,
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"API not healthy after {timeout}s:\n{_tail(self.log_path)}")

    def start_worker(self, timeout: float = 120.0) -> WorkerProcess:
        n = len(self.workers)
        w = WorkerProcess(
            self.env,
            self.data_dir.parent / f"{self.data_dir.name}-worker{n}.log",
            queue=self.env.get("CELERY_QUEUE", "gpu"),
            cmd_prefix=self.cmd_prefix,
        )
        self.workers.append(w)
        return w.start(timeout)

    def wait_ready(self, timeout: float = 180.0) -> dict:
        """Poll /readyz until 200 (the base is loaded); returns its body."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            r = httpx.get(self.base_url + "/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return last
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"not ready: {last}\n{_tail(self.log_path)}")

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        for w in self.workers:
            w.stop()
        _stop_proc(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    # -- clients --
    def client(self, key: str | None = None, timeout: float = 60.0, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        c = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, **kw)
        self._clients.append(c)
        return c

    @property
    def admin(self) -> httpx.Client:
        if not hasattr(self, "_admin"):
            self._admin = self.client(self.admin_key)
        return self._admin

    def make_tenant(self, name: str | None = None) -> TenantHandle:
        name = name or f"tenant-{uuid.uuid4().hex[:6]}"
        r = self.admin.post("/v1/admin/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        body = r.json()
        return TenantHandle(body["id"], name, body["api_key"], body["api_key_id"], self.client(body["api_key"]))

    def openai(self, key: str):
        """The official client pointed at this service."""
        from openai import OpenAI

        return OpenAI(api_key=key, base_url=self.base_url + "/v1", max_retries=0, timeout=120)


# ---------------------------------------------------------------- backends (distributed)


class DistributedBackends:
    """Creates fresh PostgreSQL databases, Redis db indexes and S3 buckets; removes them at close."""

    CLAIM_KEY = "prefixd_test_claim"

    def __init__(self):
        self._dbs: list[str] = []
        self._redis: list = []
        self._moto = None
        self.s3_endpoint: str | None = None
        self._pg = None

    def check(self) -> None:
        self._check_pg()
        self._check_redis()

    def _check_pg(self) -> None:
        import psycopg

        if self._pg is not None:
            return
        try:
            self._pg = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"PostgreSQL not reachable: {e}")

    def _check_redis(self) -> None:
        import redis

        try:
            redis.Redis.from_url(REDIS_BASE + "/0", socket_timeout=3).ping()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"Redis not reachable: {e}")

    def _moto_endpoint(self) -> str:
        if self._moto is None:
            from moto.server import ThreadedMotoServer

            port = free_port()
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self._moto.start()
            self.s3_endpoint = f"http://127.0.0.1:{port}"
        return self.s3_endpoint

    def _claim_redis_db(self) -> int:
        import redis

        for idx in secrets.SystemRandom().sample(range(1, 16), 15):
            r = redis.Redis.from_url(f"{REDIS_BASE}/{idx}", socket_timeout=3)
            # claim an empty db; the claim key keeps concurrent test runs off it
            if r.dbsize() == 0 and r.set(self.CLAIM_KEY, str(os.getpid()), nx=True, ex=3 * 3600):
                self._redis.append(r)
                return idx
            r.close()
        pytest.skip("no free Redis db index (1-15)")

    def env(self, db: bool = True, broker: bool = True, blobs: bool = True) -> dict[str, str]:
        """Env for one fresh distributed deployment (its own database, Redis db and bucket), or for
        the backends named only: db -> DATABASE_URL (a new PostgreSQL database), broker -> REDIS_URL
        (a claimed Redis db), blobs -> S3_* and AWS_* (a new bucket on moto). A backend left out
        stays embedded (SQLite, the sqla+sqlite broker, local blobs)."""
        if db:
            self._check_pg()
        if broker:
            self._check_redis()
        env: dict[str, str] = {}
        if db:
            name = f"prefixd_test_{uuid.uuid4().hex[:10]}"
            self._pg.execute(f'CREATE DATABASE "{name}"')
            self._dbs.append(name)
            env["DATABASE_URL"] = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
        if broker:
            env["REDIS_URL"] = f"{REDIS_BASE}/{self._claim_redis_db()}"
        if blobs:
            env.update(
                {
                    "S3_BUCKET": f"prefixd-test-{uuid.uuid4().hex[:10]}",
                    "S3_ENDPOINT_URL": self._moto_endpoint(),
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "S3_REGION": "us-east-1",
                }
            )
        return env

    def close(self) -> None:
        for r in self._redis:
            try:
                r.flushdb()
                r.close()
            except Exception:  # noqa: BLE001
                pass
        if self._pg is not None:
            for name in self._dbs:
                try:
                    self._pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except Exception:  # noqa: BLE001
                    pass
            self._pg.close()
        if self._moto is not None:
            self._moto.stop()


@pytest.fixture(scope="session")
def distributed_backends():
    b = DistributedBackends()
    yield b
    b.close()


# ---------------------------------------------------------------- services


def base_env(data_dir: Path, base_model: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        {
            "DATA_DIR": str(data_dir),
            "ADMIN_API_KEY": "sk-admin-test-" + secrets.token_hex(8),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TORCH_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    if base_model:
        env["BASE_MODEL"] = str(base_model)
    return env


def launch(
    tmp_root: Path,
    variant: str,
    base_model: str | None,
    backends: DistributedBackends | None,
    env: dict[str, str] | None = None,
    worker: bool = False,
) -> ServiceProcess:
    data_dir = tmp_root / f"data-{variant}-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir(parents=True)
    full = base_env(data_dir, base_model)
    if variant == "distributed":
        assert backends is not None
        full.update(backends.env())
    elif variant != "embedded":
        raise ValueError(variant)
    full.update(env or {})
    svc = ServiceProcess(full, data_dir, variant)
    svc.start()
    if worker:
        try:
            svc.start_worker()
        except BaseException:
            svc.stop()
            raise
    return svc


@pytest.fixture
def start_service(tmp_path, tiny_base_dirs, request):
    """Factory: start_service(variant="embedded", env=None, worker=False, base_model=<tiny gpt2>)."""
    started: list[ServiceProcess] = []

    def _start(
        variant: str = "embedded",
        env: dict[str, str] | None = None,
        worker: bool = False,
        base_model: str | None = None,
    ) -> ServiceProcess:
        backends = request.getfixturevalue("distributed_backends") if variant == "distributed" else None
        svc = launch(tmp_path, variant, base_model or tiny_base_dirs["gpt2"], backends, env, worker)
        started.append(svc)
        return svc

    yield _start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory, tiny_base_dirs):
    """One shared embedded API process (no worker) for the session. Make your own tenants."""
    svc = launch(tmp_path_factory.mktemp("embedded"), "embedded", tiny_base_dirs["gpt2"], None)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def distributed_service(tmp_path_factory, tiny_base_dirs, distributed_backends):
    """One shared distributed API process (PostgreSQL + Redis + S3/moto, no worker)."""
    svc = launch(tmp_path_factory.mktemp("distributed"), "distributed", tiny_base_dirs["gpt2"], distributed_backends)
    yield svc
    svc.stop()


@pytest.fixture
def admin_client(embedded_service) -> httpx.Client:
    return embedded_service.admin


@pytest.fixture
def make_tenant(embedded_service):
    """make_tenant(name=None) -> TenantHandle on the shared embedded service."""
    return embedded_service.make_tenant
