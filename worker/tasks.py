"""Thin tasks: a job (or eval run) id in, the domain function called, nothing returned through Celery."""

from __future__ import annotations

from app.evals.runner import run_eval as run_eval_run
from app.jobs.queue import RUN_EVAL_TASK, RUN_JOB_TASK
from app.jobs.runner import run_job as run_claimed_job
from worker.celery_app import celery_app


@celery_app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return run_claimed_job(job_id)


@celery_app.task(name=RUN_EVAL_TASK, ignore_result=True)
def run_eval(run_id: str) -> str:
    return run_eval_run(run_id)
