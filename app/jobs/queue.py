"""The job queue's broker side: the Celery configuration every process shares, and the `enqueue`
function the composition roots (the worker's Celery app, the API's lifespan) hand the job domain.

Only a job id crosses the broker; the database holds the job's state. Why each setting is what it
is: the docstring of worker/celery_app.py, the consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from app.config import Settings

RUN_JOB_TASK = "worker.tasks.run_job"
RUN_EVAL_TASK = "worker.tasks.run_eval"
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
# a Redis reply takes milliseconds, and the consumer's BRPOP (polling_interval 0.5 s) runs in the
# event loop, which applies no socket timeout
BROKER_SOCKET_TIMEOUT_S = 3.0


def celery_config(settings: Settings) -> dict:
    """Celery settings for producers and consumers alike."""
    return dict(
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


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app for these settings; the worker passes the task modules it runs (`include`)."""
    if settings.redis_url is None:  # the server-less broker keeps its database under DATA_DIR
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = Celery("prefixd", broker=settings.broker_url, include=include or [])
    app.conf.update(celery_config(settings))
    return app


_producers: dict[str, Celery] = {}
_producers_lock = threading.Lock()


def producer_for(settings: Settings) -> Celery:
    """One producer app per broker and queue (the API may run with settings other than the env's)."""
    key = f"{settings.broker_url}|{settings.celery_queue}"
    with _producers_lock:
        if key not in _producers:
            _producers[key] = make_celery(settings)
        return _producers[key]


def enqueue_for(settings: Settings) -> Callable[..., None]:
    """`enqueue(job_id, countdown=None)`: a `run_job(job_id)` message on the GPU queue. The producer
    is built at the first send; a send raises when the broker cannot be reached."""

    def enqueue(job_id: str, countdown: float | None = None) -> None:
        producer_for(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=settings.celery_queue,
                                         countdown=countdown)

    return enqueue


def send_eval_run_for(settings: Settings) -> Callable[[str], None]:
    """`send(run_id)`: a `run_eval(run_id)` message on the same queue as the jobs."""

    def send(run_id: str) -> None:
        producer_for(settings).send_task(RUN_EVAL_TASK, args=[run_id], queue=settings.celery_queue)

    return send
