"""Thin tasks: a job (or eval run) id in, the domain function called, nothing returned through Celery."""

from __future__ import annotations

from worker.celery_app import celery_app


@celery_app.task(name="worker.tasks.run_job", ignore_result=True)
def run_job(job_id: str) -> str:
    from app.jobs import run_job as run

    return run(job_id)


@celery_app.task(name="worker.tasks.run_eval", ignore_result=True)
def run_eval(run_id: str) -> str:
    from app.evals.runner import run_eval as run

    return run(run_id)
