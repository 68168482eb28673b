"""What the job functions need from the process around them: settings, a session factory, the blob
store and a way to enqueue. The worker builds one per process from the settings; tests and the
API pass their own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings, get_settings

log = logging.getLogger("prefixd.jobs")


def send_to_worker(settings: Settings, job_id: str, countdown: float | None = None) -> None:
    """Put `run_job(job_id)` on the GPU queue. Only the id crosses the broker."""
    from worker.celery_app import celery_app_for

    celery_app_for(settings).send_task(
        "worker.tasks.run_job", args=[job_id], queue=settings.celery_queue, countdown=countdown
    )


@dataclass
class JobContext:
    settings: Settings
    session_factory: Callable[[], Any]
    blobs: Any
    # enqueue(job_id, countdown_s | None); default: a Celery message on settings.celery_queue
    enqueue: Callable[[str, float | None], None] | None = None
    worker_name: str = "worker"
    extra: dict = field(default_factory=dict)

    def send(self, job_id: str, countdown: float | None = None) -> None:
        if self.enqueue is not None:
            self.enqueue(job_id, countdown)
        else:
            send_to_worker(self.settings, job_id, countdown)


_ctx: JobContext | None = None
_lock = threading.Lock()


def default_context() -> JobContext:
    """The process-wide context built from the environment's settings (what the worker uses)."""
    global _ctx
    with _lock:
        if _ctx is None:
            from app.store.blobs import make_blob_store
            from app.store.db import init_db, make_engine, make_session_factory

            settings = get_settings()
            engine = make_engine(settings.resolved_database_url)
            init_db(engine)
            _ctx = JobContext(settings, make_session_factory(engine), make_blob_store(settings))
        return _ctx


def set_default_context(ctx: JobContext | None) -> None:
    global _ctx
    with _lock:
        _ctx = ctx
