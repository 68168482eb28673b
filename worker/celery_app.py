"""The Celery app, configured from Settings (the same object the API reads).

GPU training facts applied here (the settings themselves: app/jobs/queue.py):
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
- This module is the worker's composition root for the job domain: it hands the job context
  `app.jobs.queue.enqueue_for(settings)` (the API's lifespan does the same).
- CUDA is never touched in the parent (pytorch#40403): torch threads are set per process on
  `worker_process_init`; the parent only runs the job monitor, which uses the database.

Brokers: `settings.broker_url`, Redis when REDIS_URL is set, else kombu's server-less
`sqla+sqlite:///DATA_DIR/broker.db`.
"""

from __future__ import annotations

import logging

from celery import signals

from app.config import get_settings
from app.jobs.context import default_context, set_default_context, set_default_enqueue
from app.jobs.monitor import Monitor
from app.jobs.queue import enqueue_for, make_celery, send_eval_run_for

log = logging.getLogger("prefixd.worker")

celery_app = make_celery(get_settings(), include=["worker.tasks"])


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


def _init_process(**kw) -> None:
    _compose(**kw)
    _set_torch_threads(**kw)


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
