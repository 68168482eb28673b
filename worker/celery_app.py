"""The Celery app, configured from Settings (the same object the API reads).

GPU training facts applied here (see ../shared/DESIGN.md, "Celery for GPU training"):
- `task_acks_late` + `worker_prefetch_multiplier=1`: a worker reserves one job at a time, so a
  second job never waits behind a long one on a busy worker. Run one worker process per GPU
  (`-c 1`, `CUDA_VISIBLE_DEVICES=<i>`) on the `gpu` queue.
- `task_reject_on_worker_lost`: a message whose worker died is delivered again. The database,
  not Celery, holds the job state: the task's compare-and-set claim makes a duplicate delivery a
  no-op, and a stale heartbeat hands the job to the next worker, which resumes from its checkpoint.
- A long visibility timeout, so Redis does not redeliver a message of a job still running
  (celery#5935); the heartbeat monitor handles workers that really died.
- No result backend: results live in the jobs table.
- A publish gives up within seconds: one retry, and Redis socket timeouts of
  `BROKER_SOCKET_TIMEOUT_S` (without them a publish to a Redis that stalls, or whose connection
  went half-open, waits forever). A job whose message was not sent is still owed it in the outbox
  (app/jobs/outbox.py), and the job monitor sends it once the broker answers.
- This module is the worker's composition root for the job domain: `enqueue_for(settings)` is
  the `enqueue` function the worker's job context gets (and the API's, from its lifespan).
- CUDA is never touched in the parent (pytorch#40403): torch threads are set per process on
  `worker_process_init`; the parent only runs the job monitor, which uses the database.

Brokers: `settings.broker_url`, Redis when REDIS_URL is set, else kombu's server-less
`sqla+sqlite:///DATA_DIR/broker.db`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from celery import Celery, signals

from app.config import Settings, get_settings
from app.jobs.context import default_context, set_default_context, set_default_enqueue

log = logging.getLogger("prefixd.worker")

VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
# a Redis reply takes milliseconds, and the consumer's BRPOP (polling_interval 0.5 s) runs in the
# event loop, which applies no socket timeout
BROKER_SOCKET_TIMEOUT_S = 3.0


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url is None:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = Celery("prefixd", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.celery_queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # kombu's sqla transport hands its transport options to create_engine: give it none
        broker_transport_options=(
            {"visibility_timeout": VISIBILITY_TIMEOUT_S, "polling_interval": 0.5,
             "socket_timeout": BROKER_SOCKET_TIMEOUT_S, "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S}
            if settings.redis_url else {}
        ),
        # one retry covers a pooled connection that a broker restart closed; more would only hold
        # the sender (an API thread, a monitor pass) while the broker is down
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 0.5},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app


celery_app = make_celery(get_settings())

_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def celery_app_for(settings: Settings) -> Celery:
    """A producer app for these settings (the API may run with settings other than the env's)."""
    if settings.broker_url == celery_app.conf.broker_url and settings.celery_queue == celery_app.conf.task_default_queue:
        return celery_app
    with _apps_lock:
        key = f"{settings.broker_url}|{settings.celery_queue}"
        if key not in _apps:
            _apps[key] = make_celery(settings)
        return _apps[key]


def enqueue_for(settings: Settings) -> Callable[..., None]:
    """`enqueue(job_id, countdown_s=None)`: a `run_job(job_id)` message on the GPU queue; only the
    id crosses the broker. Raises when the broker cannot be reached."""
    app = celery_app_for(settings)

    def enqueue(job_id: str, countdown: float | None = None) -> None:
        app.send_task("worker.tasks.run_job", args=[job_id], queue=settings.celery_queue, countdown=countdown)

    return enqueue


def send_eval_run_for(settings: Settings) -> Callable[[str], None]:
    """`send(run_id)`: a `run_eval(run_id)` message on the same queue as the jobs."""
    app = celery_app_for(settings)

    def send(run_id: str) -> None:
        app.send_task("worker.tasks.run_eval", args=[run_id], queue=settings.celery_queue)

    return send


def _compose(**_kw) -> None:
    """The worker's job context sends through this Celery app."""
    set_default_enqueue(enqueue_for(get_settings()))


def _set_torch_threads(**_kw) -> None:
    import torch

    n = max(1, get_settings().torch_threads)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(max(1, n))
    except RuntimeError:  # already set in this process
        pass


def _preload(**_kw) -> None:
    """Import the engine before the first job (tens of seconds on a busy CPU), not while a job
    waits. Imports only: no model is loaded and CUDA is not touched."""
    try:
        import app.jobs.runner  # noqa: F401
        import app.ml.adapter  # noqa: F401
        import app.ml.base  # noqa: F401
        import app.ml.evaluate  # noqa: F401
        import app.ml.pretrain  # noqa: F401
        import app.ml.train  # noqa: F401
    except Exception:
        log.warning("preloading the engine failed; jobs import it on first use", exc_info=True)


def _init_process(**kw) -> None:
    _compose(**kw)
    _set_torch_threads(**kw)
    _preload(**kw)


def _init_child(**kw) -> None:
    """A forked pool child must not reuse the parent's database connections."""
    set_default_context(None)
    _init_process(**kw)


# worker_init: the main process (solo pool runs tasks there); worker_process_init: each forked child
signals.worker_init.connect(_init_process, weak=False)
signals.worker_process_init.connect(_init_child, weak=False)

_monitor = None


@signals.worker_ready.connect(weak=False)
def _start_monitor(**_kw) -> None:
    """Requeue jobs whose worker died, promote jobs whose files finished validation."""
    global _monitor
    from app.jobs.monitor import Monitor

    try:
        ctx = default_context()
        ctx.extra.setdefault("send_eval_run", send_eval_run_for(get_settings()))  # app.evals.dispatch
        _monitor = Monitor(ctx).start()
    except Exception:
        log.exception("could not start the job monitor")


@signals.worker_shutdown.connect(weak=False)
def _stop_monitor(**_kw) -> None:
    if _monitor is not None:
        _monitor.stop()
