"""Admin: which bases exist and which one this API process serves.

`POST /v1/admin/bases {"path", "id"?}` registers a service base from a server-side HF directory or
`.gguf` file (converted once into a float directory; see app/store/base_registry.py `register_source`). Only the
admin names paths; tenants then see the base in `GET /v1/models` and can train prefixes on it. Bad
input is a 400 naming the path and the reason, an id holding other weights a 409; either way,
nothing is registered and the served base stays as it was. Registering never switches serving.

`GET /v1/admin/serving` shows the served base;
`POST /v1/admin/serving {"model": id}` loads another registered base (a service base or a
tenant's base job) and serves it from the next batch on, with no process restart.

Requests queued for the old base when the switch lands answer 409 (`base_changed`); adapters of
the old base answer 409 (`adapter_base_mismatch`) until it is served again. The choice lasts for
this process's lifetime: a restart serves BASE_MODEL (or the default base) again, and each API
replica is switched on its own.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminDep, BlobsDep, SessionDep, SettingsDep
from app.api.errors import APIError
from app.api.models import ModelObject, _served_of, get_engine, model_public
from app.store.base_registry import BaseIdTaken, BaseSourceError, materialize_base, register_source
from app.store.tables import ModelRecord

router = APIRouter(tags=["admin"])


class ServingSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=255)


class BaseRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096, description="a HF directory or .gguf file on the server")
    id: str | None = Field(default=None, min_length=1, max_length=64,
                           description="the base's id; default: slug of the directory's name or the file's stem")


class ServingStatus(BaseModel):
    object: Literal["serving"] = "serving"
    model: str | None
    fingerprint: str | None
    ready: bool
    loading: bool
    error: str | None = None
    queued: int
    adapter_cache: dict


def _status(engine) -> ServingStatus:
    s = engine.status()
    return ServingStatus(model=s["model"], fingerprint=s["fingerprint"], ready=s["ready"], loading=s["loading"],
                         error=s["error"], queued=s["queued"], adapter_cache=s["adapter_cache"])


@router.get("/v1/admin/serving", response_model=ServingStatus)
def serving_status(request: Request, _admin: AdminDep) -> ServingStatus:
    return _status(get_engine(request))


@router.post("/v1/admin/serving", response_model=ServingStatus)
async def switch_serving(body: ServingSwitch, request: Request, _admin: AdminDep, session: SessionDep,
                         blobs: BlobsDep, settings: SettingsDep) -> ServingStatus:
    engine = get_engine(request)
    record = await run_in_threadpool(session.get, ModelRecord, body.model)
    if record is None:
        raise APIError(404, f"The model '{body.model}' does not exist", param="model", code="model_not_found")
    if record.kind != "base":
        raise APIError(400, f"'{body.model}' is an adapter; only a base model can be served", param="model",
                       code="not_a_base")
    record_id, fingerprint = record.id, record.fingerprint

    def load():
        path = materialize_base(settings, blobs, record)
        return engine.switch_base(record_id, str(path))

    try:
        served = await run_in_threadpool(load)
    except FileNotFoundError as e:
        raise APIError(409, f"The base '{record_id}' is not available in storage: {e}", param="model",
                       code="model_unavailable", headers={"x-should-retry": "false"}) from None
    if fingerprint and served.fingerprint != fingerprint:
        # the files changed since registration: keep the record true to what is served
        record.fingerprint = served.fingerprint
        await run_in_threadpool(session.commit)
    return _status(engine)


@router.post(
    "/v1/admin/bases",
    response_model=ModelObject,
    status_code=201,
    responses={200: {"model": ModelObject, "description": "These weights are already registered under this id"}},
)
async def register_base_from_path(
    body: BaseRegistration,
    request: Request,
    response: Response,
    _admin: AdminDep,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
) -> ModelObject:
    """201 with the new base; 200 when these weights are already registered under this id. A GGUF
    converts in the request, once (its time: docs/BASES.md)."""

    try:
        record, created = await run_in_threadpool(register_source, settings, session, blobs, body.path, body.id)
    except BaseSourceError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_base") from None
    except BaseIdTaken as e:
        raise APIError(409, str(e), param="id", code="model_id_taken", headers={"x-should-retry": "false"}) from None
    if not created:
        response.status_code = 200
    return model_public(record, _served_of(request))
