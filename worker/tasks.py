"""Thin tasks: a job id in, the domain function called, nothing returned through Celery."""

from __future__ import annotations

from app.jobs.queue import RUN_JOB_TASK
from app.jobs.runner import run_job as run_claimed_job
from worker.celery_app import celery_app


@celery_app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return run_claimed_job(job_id)
