"""Fine-tuning jobs: the domain code the API router and the Celery task share.

- `spec`: the strict request models and their limits;
- `state`: the state machine in the database (compare-and-set claim, heartbeats, cancel, requeue);
- `service`: create/list/get/cancel and the OpenAI-shaped views (what the router calls);
- `runner`: the worker side (`run_job`: claim, train through `app.ml`, record results);
- `outbox`: the broker messages queued jobs are owed, committed with them, and their relay;
- `monitor`: the periodic check (stale heartbeats, jobs waiting for file validation, the relay).
"""

from app.jobs.context import JobContext, default_context
from app.jobs.state import claim_job, requeue_stale_jobs

__all__ = ["JobContext", "default_context", "claim_job", "requeue_stale_jobs"]
