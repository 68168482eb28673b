"""What the job functions need from the process around them: settings, a session factory, the blob
store and a way to enqueue. The job domain does not know its transport: a composition root hands
it an `enqueue` function (worker/celery_app.py for the worker's default context, the jobs router's
lifespan for the API, a recording function in tests)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings, get_settings
from app.store.blobs import make_blob_store
from app.store.db import init_db, make_engine, make_session_factory

log = logging.getLogger("prefixd.jobs")

# enqueue(job_id, countdown_s=None): put `run_job(job_id)` on the broker, after countdown_s if given
Enqueue = Callable[..., None]


class NoBroker(RuntimeError):
    """This context was given no enqueue function: it cannot send (a monitor elsewhere does)."""


@dataclass
class JobContext:
    settings: Settings
    session_factory: Callable[[], Any]
    blobs: Any
    # None: this process only writes the outbox (app/jobs/outbox.py); a process with a broker sends
    enqueue: Enqueue | None = None
    worker_name: str = "worker"
    extra: dict = field(default_factory=dict)

    def send(self, job_id: str, countdown: float | None = None) -> None:
        """One message now. Callers other than the outbox's relay should write an outbox entry
        (`app.jobs.outbox.write`) instead, so that a lost message is sent again."""
        if self.enqueue is None:
            raise NoBroker(f"no enqueue function to send job {job_id}")
        if countdown is None:
            self.enqueue(job_id)
        else:
            self.enqueue(job_id, countdown)


_ctx: JobContext | None = None
_enqueue: Enqueue | None = None
_lock = threading.Lock()


def set_default_enqueue(enqueue: Enqueue | None) -> None:
    """The enqueue function of the process-wide context (set by the worker's Celery app)."""
    global _enqueue
    with _lock:
        _enqueue = enqueue
        if _ctx is not None:
            _ctx.enqueue = enqueue


def default_context() -> JobContext:
    """The process-wide context built from the environment's settings (what the worker uses)."""
    global _ctx
    with _lock:
        if _ctx is None:
            settings = get_settings()
            engine = make_engine(settings.resolved_database_url)
            init_db(engine)
            _ctx = JobContext(settings, make_session_factory(engine), make_blob_store(settings), enqueue=_enqueue)
        return _ctx


def set_default_context(ctx: JobContext | None) -> None:
    global _ctx
    with _lock:
        _ctx = ctx
