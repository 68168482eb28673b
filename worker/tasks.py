"""Thin tasks: a job id in, the domain function called, nothing returned through Celery."""

from __future__ import annotations

from worker.celery_app import celery_app


@celery_app.task(name="worker.tasks.run_job", ignore_result=True)
def run_job(job_id: str) -> str:
    from app.jobs import run_job as run

    return run(job_id)
