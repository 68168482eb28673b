"""`python -m app.run` (what `make run` calls): the API and one Celery worker, in the foreground.

- Ensures DATA_DIR, resolves the admin key (generated, saved to DATA_DIR/admin_key with mode 0600
  and printed once in embedded mode when ADMIN_API_KEY is unset), and passes it to both children.
- Starts `uvicorn app.main:create_app --factory` on HOST:PORT and
  `celery -A worker.celery_app worker -Q gpu -c 1 --pool solo` (skipped with a warning while
  `worker/celery_app.py` does not exist), each with OMP_NUM_THREADS / TORCH_THREADS set from
  the TORCH_THREADS setting (the API and the worker share the cores).
- Ctrl-C / SIGTERM are forwarded to both; when either child exits, the other is stopped.
- `--api-only` / `--worker-only` start one of the two (scale-out: K API replicas, N workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def child_env(settings: Settings, admin_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(max(1, settings.torch_threads))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    env["TORCH_THREADS"] = threads
    env["DATA_DIR"] = str(settings.data_dir.resolve())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if admin_key:
        env["ADMIN_API_KEY"] = admin_key
    env["PYTHONUNBUFFERED"] = "1"
    return env


def commands(settings: Settings, port: int) -> tuple[list[str], list[str] | None]:
    api = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
           "--host", settings.host, "--port", str(port)]
    worker = None
    if (ROOT / "worker" / "celery_app.py").is_file():
        worker = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                  "-Q", settings.celery_queue, "-c", "1", "--pool", "solo", "--loglevel", "INFO"]
    return api, worker


def _stop(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from app.api.deps import load_or_create_admin_key

    parser = argparse.ArgumentParser(prog="python -m app.run", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--api-only", action="store_true", help="start the API without a worker")
    group.add_argument("--worker-only", action="store_true", help="start one Celery worker without the API")
    args = parser.parse_args(argv)

    settings = Settings()
    port = int(os.environ.get("PORT", settings.port))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key, generated = load_or_create_admin_key(settings)
    if generated:
        print(f"prefixd: admin key (shown once; saved to {settings.data_dir / 'admin_key'}, mode 0600):\n  {key}",
              flush=True)
    elif key and not settings.admin_api_key:
        print(f"prefixd: admin key in {settings.data_dir / 'admin_key'}", flush=True)
    env = child_env(settings, key)
    api_cmd, worker_cmd = commands(settings, port)
    procs: list[subprocess.Popen] = []
    names: list[str] = []
    if not args.worker_only:
        procs.append(subprocess.Popen(api_cmd, cwd=ROOT, env=env, start_new_session=True))
        names.append("API")
    if args.api_only:
        pass
    elif worker_cmd:
        procs.append(subprocess.Popen(worker_cmd, cwd=ROOT, env=env, start_new_session=True))
        names.append("worker")
    elif args.worker_only:
        print("prefixd: worker/celery_app.py not found", file=sys.stderr, flush=True)
        return 2
    else:
        print("prefixd: worker/celery_app.py not found; starting the API without a worker", file=sys.stderr,
              flush=True)
    if not args.worker_only:
        print(f"prefixd: API on http://{settings.host}:{port}  (Ctrl-C stops everything)", flush=True)

    stopping = {"sig": None}

    def on_signal(signum, _frame):
        stopping["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        while stopping["sig"] is None:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                code = dead[0].returncode or 1
                print(f"prefixd: {names[procs.index(dead[0])]} exited ({dead[0].returncode}); "
                      "stopping", file=sys.stderr, flush=True)
                break
            time.sleep(0.5)
    finally:
        _stop(procs)
    return 0 if stopping["sig"] is not None else code


if __name__ == "__main__":
    sys.exit(main())
