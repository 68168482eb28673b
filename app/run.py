"""`python -m app.run` (what `make run` calls): the API and one Celery worker, in the foreground.

- Ensures DATA_DIR, resolves the admin key (generated, saved to DATA_DIR/admin_key with mode 0600
  and printed once in embedded mode when ADMIN_API_KEY is unset), and passes it to both children.
- Starts `uvicorn app.main:create_app --factory` on HOST:PORT and
  `celery -A worker.celery_app worker -Q gpu -c 1 --pool solo` (skipped with a warning while
  `worker/celery_app.py` does not exist), each with OMP_NUM_THREADS / TORCH_THREADS set from
  the TORCH_THREADS setting (the API and the worker share the cores).
- Supervises them: a child that exits (OOM, `kill -9`) is started again after 1, 2, 4 ... 30 s
  (`RestartPolicy`), and a job its worker held resumes from its checkpoint once the job monitor
  sees the stale heartbeat. A child that exits 5 times within 60 s stops everything (exit 1).
- Ctrl-C / SIGTERM are forwarded to both, and stop the service (exit 0).
- `--api-only` / `--worker-only` start one of the two (scale-out: K API replicas, N workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.api.deps import load_or_create_admin_key
from app.config import Settings
from app.jobs.state import expire_worker
from app.store.db import make_engine, make_session_factory

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


@dataclass
class RestartPolicy:
    """When to start an exited child again. Pure: the caller passes the clock.

    The delay doubles with each exit of a streak (1, 2, 4 ... `max_delay_s`); a child that ran for
    `window_s` before it exited starts a new streak, so a rare crash costs 1 s, not 30. The
    `max_exits`-th exit within `window_s` gives up: a child that cannot stay up (a bad setting, a
    broken install) stops the service rather than crash-looping behind a green terminal."""

    max_exits: int = 5
    window_s: float = 60.0
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    exits: list[float] = field(default_factory=list)
    streak: int = 0

    def on_exit(self, now: float, started_at: float) -> float | None:
        """Record an exit at `now` of a child started at `started_at`: the seconds to wait before
        starting it again, or None to give up."""
        self.exits = [t for t in self.exits if now - t < self.window_s] + [now]
        if len(self.exits) >= self.max_exits:
            return None
        if now - started_at >= self.window_s:
            self.streak = 0
        self.streak += 1
        return min(self.max_delay_s, self.base_delay_s * 2 ** (self.streak - 1))


@dataclass
class Child:
    name: str
    cmd: list[str]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while waiting out the backoff
    on_exit: Callable[[int], None] | None = None  # called with the pid of the process that exited


def release_jobs_of(settings: Settings) -> Callable[[int], None]:
    """What to do when a worker process exits: its running jobs are marked stale, so the job
    monitor requeues them within a pass (seconds) instead of after JOB_STALE_AFTER_S."""

    def release(pid: int) -> None:
        try:
            engine = make_engine(settings.resolved_database_url)
            try:
                with make_session_factory(engine)() as s:
                    n = expire_worker(s, f"{socket.gethostname()}:{pid}:")
                    s.commit()
            finally:
                engine.dispose()
        except Exception as exc:  # noqa: BLE001 - the heartbeat timeout still recovers the jobs
            _say(
                f"could not release the jobs of worker {pid} ({exc}); they are requeued when their heartbeat goes stale"
            )
            return
        if n:
            _say(f"worker {pid} held {n} running job(s); they resume from their last checkpoint")

    return release


def _say(msg: str) -> None:
    print(f"prefixd: {msg}", file=sys.stderr, flush=True)


def _start(child: Child, env: dict[str, str], cwd: Path) -> None:
    # a session of its own: Ctrl-C in the terminal reaches only the supervisor, which forwards it
    child.proc = subprocess.Popen(child.cmd, cwd=cwd, env=env, start_new_session=True)
    child.started_at = time.monotonic()
    child.restart_at = None


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


def supervise(
    children: list[Child], env: dict[str, str], should_stop: Callable[[], bool], cwd: Path = ROOT, poll_s: float = 0.2
) -> int:
    """Start `children`, restart each one that exits as its policy says, until `should_stop()`
    (0) or a policy gives up (1). Every child is stopped before this returns."""
    try:
        for c in children:
            _start(c, env, cwd)
            _say(f"{c.name} started (pid {c.proc.pid})")
        while not should_stop():
            now = time.monotonic()
            for c in children:
                if c.restart_at is None and c.proc.poll() is not None:
                    if c.on_exit is not None:
                        c.on_exit(c.proc.pid)
                    delay = c.policy.on_exit(now, c.started_at)
                    if delay is None:
                        _say(
                            f"{c.name} exited ({c.proc.returncode}), {len(c.policy.exits)} times within "
                            f"{c.policy.window_s:g} s; stopping"
                        )
                        return 1
                    _say(f"{c.name} exited ({c.proc.returncode}); restarting in {delay:g} s")
                    c.restart_at = now + delay
                elif c.restart_at is not None and now >= c.restart_at:
                    _start(c, env, cwd)
                    _say(f"{c.name} restarted (pid {c.proc.pid})")
            time.sleep(poll_s)
        return 0
    finally:
        _stop([c.proc for c in children if c.proc is not None])


def main(argv: list[str] | None = None) -> int:
    import argparse


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
        print(
            f"prefixd: admin key (shown once; saved to {settings.data_dir / 'admin_key'}, mode 0600):\n  {key}",
            flush=True,
        )
    elif key and not settings.admin_api_key:
        print(f"prefixd: admin key in {settings.data_dir / 'admin_key'}", flush=True)
    env = child_env(settings, key)
    api_cmd, worker_cmd = commands(settings, port)
    children: list[Child] = []
    if not args.worker_only:
        children.append(Child("API", api_cmd))
    if args.api_only:
        pass
    elif worker_cmd:
        children.append(Child("worker", worker_cmd, on_exit=release_jobs_of(settings)))
    elif args.worker_only:
        print("prefixd: worker/celery_app.py not found", file=sys.stderr, flush=True)
        return 2
    else:
        print("prefixd: worker/celery_app.py not found; starting the API without a worker", file=sys.stderr, flush=True)

    stopping = {"sig": None}

    def on_signal(signum, _frame):
        stopping["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not args.worker_only:
        print(f"prefixd: API on http://{settings.host}:{port}  (Ctrl-C stops everything)", flush=True)
    return supervise(children, env, lambda: stopping["sig"] is not None)


if __name__ == "__main__":
    sys.exit(main())
