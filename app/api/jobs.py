"""Fine-tuning jobs: `/v1/fine_tuning/jobs` in OpenAI's shapes, plus our `prefix` and `base` methods.

The router is thin: it parses, calls `app.jobs.service`, commits (a queued job together with its
outbox entry, `app.jobs.outbox`), answers, and then relays the entry to the broker in the
background: a broker that is down or stalls never delays or fails the answer, and the monitor
sends what the relay could not. Only the job id crosses the broker. Request bodies are strict
(`extra="forbid"`); a bad field is a 400 whose `param` is the field's path, e.g.
`method.prefix.hyperparameters.n_epochs`.

The router's lifespan runs the job monitor (`app.jobs.monitor`) in the API process too, so jobs
waiting for file validation move on, jobs of dead workers are requeued, and outbox entries are
sent, even with no worker monitor running. The lifespan is the API's composition root for the job
domain: it hands the job context its `enqueue` function (`app.state.enqueue` when set, else the
Celery producer of `worker.celery_app`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Body, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.errors import APIError
from app.api.files import token_counter
from app.jobs import outbox, service
from app.jobs.context import JobContext
from app.jobs.monitor import Monitor
from app.jobs.queue import enqueue_for, send_eval_run_for
from app.jobs.spec import JobCreate, SpecError, loc_to_param

log = logging.getLogger("prefixd.api.jobs")


# ----------------------------------------------------------------------------- response models


class JobErrorPublic(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    error: JobErrorPublic | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    training_file: str
    validation_file: str | None = None
    trained_tokens: int | None = None
    seed: int
    result_files: list[str] = Field(default_factory=list)
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    estimated_finish: int | None = None
    organization_id: str
    user_provided_suffix: str | None = None
    integrations: list = Field(default_factory=list)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = Field(default_factory=dict)


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobCheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpointPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# ----------------------------------------------------------------------------- plumbing


def _api_error(e: SpecError) -> APIError:
    return APIError(e.status_code, e.message, param=e.param, code=e.code or (
        "invalid_request" if e.status_code == 400 else None))


class JobsRoute(APIRoute):
    """Body validation errors name the field by its public path (no pydantic union tags)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                errs = e.errors()
                first = errs[0] if errs else {}
                if first.get("type") == "json_invalid":
                    raise APIError(400, "The request body is not valid JSON", code="invalid_json") from None
                param = loc_to_param(first.get("loc", ()))
                kind = first.get("type")
                if param is None:
                    msg = f"Invalid request body: {first.get('msg', 'expected a JSON object')}"
                elif kind == "extra_forbidden":
                    msg = f"Unknown parameter: '{param}'"
                elif kind == "missing":
                    msg = f"Missing required parameter: '{param}'"
                else:
                    msg = f"Invalid value for '{param}': {first.get('msg')}"
                raise APIError(400, msg, param=param, code="invalid_request") from None
            except SpecError as e:
                raise _api_error(e) from None

        return route_handler


def _new_jobs_context(app) -> JobContext:
    st = app.state
    # files the monitor validates (app.jobs.recovery) count tokens with the served tokenizer; eval
    # runs the monitor relays (app.evals.dispatch) go through the same broker as jobs
    st.jobs_context = JobContext(st.settings, st.session_factory, st.blobs,
                                 enqueue=getattr(st, "enqueue", None) or enqueue_for(st.settings),
                                 extra={"count_tokens": lambda: token_counter(app),
                                        "send_eval_run": getattr(st, "eval_enqueue", None)
                                        or send_eval_run_for(st.settings)})
    return st.jobs_context


def _ctx(request: Request) -> JobContext:
    return getattr(request.app.state, "jobs_context", None) or _new_jobs_context(request.app)


@asynccontextmanager
async def lifespan(app):
    """Start the job monitor once the app's own lifespan has set up the database."""
    monitor = None
    st = app.state
    if getattr(st, "session_factory", None) is not None:
        monitor = Monitor(_new_jobs_context(app)).start()
    try:
        yield
    finally:
        if monitor is not None:
            await asyncio.to_thread(monitor.stop)


router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], route_class=JobsRoute,
                   lifespan=lifespan)

JobId = Annotated[str, Path(description="The fine-tuning job's id", max_length=64)]
After = Annotated[str | None, Query(description="The last id of the previous page", max_length=64)]


Limit = Annotated[int, Query(ge=1, le=service.MAX_PAGE, description=f"Page size, 1 to {service.MAX_PAGE}")]


def _refresh_validating(request: Request, background: BackgroundTasks, session, job) -> None:
    """A job waiting for its files: check them now rather than at the monitor's next pass."""
    if job.status != "validating_files":
        return
    ids = service.promote_validating(session, job.tenant_id, job.id)
    session.commit()
    if ids:
        background.add_task(outbox.relay_soon, _ctx(request), ids)
    session.refresh(job)


# ----------------------------------------------------------------------------- routes


@router.post("", response_model=JobPublic, summary="Create a fine-tuning job")
def create_job(body: Annotated[JobCreate, Body()], request: Request, background: BackgroundTasks,
               tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> dict:
    """Methods: `{"type": "prefix", "prefix": {...}}` (the default; OpenAI's `supervised` is an
    alias), or `{"type": "base", "base": {...}}` with `model` a base to continue, or `"scratch"`."""
    job = service.create_job(session, tenant, body, settings)
    session.commit()  # a queued job with its outbox entry: `queued` is an answer the job keeps
    if job.status == "queued":
        background.add_task(outbox.relay_soon, _ctx(request), [job.id])
    session.refresh(job)
    return service.job_public(job)


@router.get("", response_model=JobList, summary="List fine-tuning jobs, newest first")
def list_jobs(request: Request, tenant: TenantDep, session: SessionDep, after: After = None,
              limit: Limit = 20) -> dict:
    """`metadata[k]=v` filters as OpenAI's does (the official client sends a dict that way)."""
    return service.list_jobs(session, tenant.id, after, limit, metadata_filter(request))


def metadata_filter(request: Request) -> dict[str, str] | None:
    """`metadata[k]=v` query parameters as `{k: v}`; None when there are none. A bare `metadata=`
    names no key, so it is a 400 rather than a filter silently dropped."""
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            raise APIError(400, "use metadata[key]=value to filter by metadata", param="metadata")
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            out[name[len("metadata["):-1]] = value
    return out or None


@router.get("/{fine_tuning_job_id}", response_model=JobPublic, summary="Get a fine-tuning job")
def get_job(fine_tuning_job_id: JobId, request: Request, background: BackgroundTasks, tenant: TenantDep,
            session: SessionDep) -> dict:
    job = service.get_job(session, tenant.id, fine_tuning_job_id)
    _refresh_validating(request, background, session, job)
    return service.job_public(job)


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobPublic, summary="Cancel a fine-tuning job")
def cancel_job(fine_tuning_job_id: JobId, tenant: TenantDep, session: SessionDep) -> dict:
    """Queued or validating: cancelled at once. Running: the training loop stops within seconds
    (it checks the flag about once a second) and the job then reads `cancelled`."""
    job = service.cancel_job(session, tenant.id, fine_tuning_job_id)
    session.commit()
    return service.job_public(job)


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList,
            summary="List a job's events, newest first")
def list_events(fine_tuning_job_id: JobId, tenant: TenantDep, session: SessionDep, after: After = None,
                limit: Limit = 20) -> dict:
    return service.list_events(session, tenant.id, fine_tuning_job_id, after, limit)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=JobCheckpointList,
            summary="List a job's checkpoints, newest first")
def list_checkpoints(fine_tuning_job_id: JobId, tenant: TenantDep, session: SessionDep, after: After = None,
                     limit: Limit = 10) -> dict:
    return service.list_checkpoints(session, tenant.id, fine_tuning_job_id, after, limit)
