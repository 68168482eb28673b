"""Models: `GET /v1/models`, `GET /v1/models/{id}`, `DELETE /v1/models/{id}`,
`GET /v1/models/{id}/export` (PEFT zip) and `POST /v1/models/import` (PEFT zip upload).

A tenant sees the served base (listed first), the service's own bases, its own bases (from base
jobs) and its own adapters; anything else answers 404, as if it did not exist. Model ids contain
':' (`ft:{base}:{tenant_id}:{suffix}:{job}`), so the path parameter is declared
`{model_id:path}`; the `/export` route is declared first so it is not swallowed by it.

The model object is OpenAI's `{id, object:"model", created, owned_by}` plus our extensions:
`kind` (base|adapter), `base` (an adapter's base), `served` (whether it can answer completions
now), `num_virtual_tokens`, `job_id`, `size_bytes`.

`resolve_model` is also what the inference routes use:
- unknown id or another tenant's model: 404 `model_not_found`;
- a base that is not being served: 409 `model_not_served` (`x-should-retry: false`);
- an adapter trained for another base (or for a base that is not being served now): 409
  `adapter_base_mismatch` with `x-should-retry: false`;
- no base loaded yet: 503 with `Retry-After`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import or_, select

from app.api.deps import BlobsDep, SessionDep, SettingsDep, TenantDep
from app.api.errors import APIError
from app.ml.adapter import (
    AdapterFormatError,
    AdapterMismatchError,
    ZipLimits,
    adapter_to_bytes,
    export_peft_zip,
    import_peft_zip,
)
from app.serving.lifecycle import load_adapter_blob
from app.store.storage import with_reserve
from app.store.tables import Job, ModelRecord, new_id, now
from app.tenancy import stop_broadcast
from app.tenancy.quotas import check_adapter_count, insert_with_blob

router = APIRouter(tags=["models"])

SUFFIX_RE = re.compile(r"^[a-z0-9-]{1,40}$")
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")
NO_RETRY = {"x-should-retry": "false"}


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "adapter"]
    base: str | None = None
    served: bool = False
    num_virtual_tokens: int | None = None
    job_id: str | None = None
    size_bytes: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# ---------------------------------------------------------------------------------- helpers


def get_engine(request: Request):
    engine = getattr(request.app.state, "serving", None)
    if engine is None:
        raise APIError(503, "Inference is disabled on this server (SERVING_ENABLED=0)", code="serving_disabled")
    return engine


def require_ready(engine):
    served = engine.served
    if served is None:
        msg = engine.error or "The base model is still loading; retry shortly"
        raise APIError(503, msg, code="model_loading", headers={"Retry-After": "5"})
    return served


def _served_of(request: Request):
    engine = getattr(request.app.state, "serving", None)
    return engine.served if engine is not None else None


def model_public(record: ModelRecord, served=None) -> ModelObject:
    if record.kind == "base":
        is_served = served is not None and served.id == record.id
    else:
        is_served = served is not None and record.fingerprint == served.fingerprint
    return ModelObject(
        id=record.id, created=record.created_at, owned_by=record.tenant_id or "system", kind=record.kind,
        base=record.base_id, served=is_served, num_virtual_tokens=record.num_virtual_tokens,
        job_id=record.job_id, size_bytes=record.size_bytes,
    )


def visible_record(session, tenant_id: str, model_id: str, served=None) -> ModelRecord | None:
    """The record if this tenant may see it: its own, the service's, or the base being served."""
    record = session.get(ModelRecord, model_id)
    if record is None:
        return None
    if record.tenant_id is None or record.tenant_id == tenant_id:
        return record
    if record.kind == "base" and served is not None and served.id == record.id:
        return record
    return None


def not_found(model_id: str, param: str | None = "model") -> APIError:
    return APIError(404, f"The model '{model_id}' does not exist", param=param, code="model_not_found")


@dataclass
class Resolved:
    record: ModelRecord | None
    served: Any  # ServedBase
    prefix: Any = None  # KV or None
    num_virtual_tokens: int = 0


def resolve_model(session, engine, tenant_id: str, model_id: str, *, param: str = "model") -> Resolved:
    """What a completion/classify request runs on (sync: call it in a thread)."""
    served = require_ready(engine)
    record = visible_record(session, tenant_id, model_id, served)
    if record is None:
        if model_id == served.id:  # served but not registered (should not happen): still servable
            return Resolved(None, served)
        raise not_found(model_id, param)
    if record.kind == "base":
        if record.id != served.id:
            raise APIError(
                409, f"The base model '{record.id}' is not being served (this server serves '{served.id}'). "
                     f"An admin can serve it with POST /v1/admin/serving {{\"model\": \"{record.id}\"}}.",
                param=param, code="model_not_served", headers=NO_RETRY)
        return Resolved(record, served)
    if record.fingerprint != served.fingerprint:
        raise adapter_mismatch(record, served, param)

    try:
        entry = engine.prefix_for(record.id, record.blob_key, tenant_id=record.tenant_id)
    except AdapterMismatchError as e:
        raise APIError(409, f"The adapter '{record.id}' does not fit the served base '{served.id}': {e}",
                       param=param, code="adapter_base_mismatch", headers=NO_RETRY) from None
    except AdapterFormatError as e:
        raise APIError(500, f"The stored adapter '{record.id}' is unreadable: {e}", type="server_error",
                       code="adapter_corrupt") from None
    except KeyError:
        raise APIError(500, f"The stored adapter '{record.id}' is missing from storage", type="server_error",
                       code="adapter_missing") from None
    return Resolved(record, served, entry.key_values, entry.num_virtual_tokens)


def adapter_mismatch(record: ModelRecord, served, param: str | None = "model") -> APIError:
    return APIError(
        409, f"The adapter '{record.id}' was trained for base '{record.base_id}', but this server serves "
             f"'{served.id}'. It answers again once '{record.base_id}' is served "
             f"(POST /v1/admin/serving).",
        param=param, code="adapter_base_mismatch", headers=NO_RETRY)


def _tenant_adapter(session, tenant_id: str, model_id: str, served) -> ModelRecord:
    record = visible_record(session, tenant_id, model_id, served)
    if record is None:
        raise not_found(model_id, None)
    return record


# ---------------------------------------------------------------------------------- routes


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request, tenant: TenantDep, session: SessionDep) -> ModelList:
    served = _served_of(request)
    conds = [ModelRecord.tenant_id.is_(None), ModelRecord.tenant_id == tenant.id]
    if served is not None:
        conds.append(ModelRecord.id == served.id)
    rows = session.scalars(
        select(ModelRecord).where(or_(*conds)).order_by(ModelRecord.created_at, ModelRecord.id)
    ).all()
    # the served base first (clients that take data[0] get what answers), then the other bases
    served_id = served.id if served is not None else None
    rows = sorted(rows, key=lambda r: (r.id != served_id, r.kind != "base", r.created_at, r.id))
    return ModelList(data=[model_public(r, served) for r in rows])


@router.get("/v1/models/{model_id:path}/export", response_class=Response,
            responses={200: {"content": {"application/zip": {}}, "description": "A PEFT prefix-tuning zip"}})
def export_model(model_id: str, request: Request, tenant: TenantDep, session: SessionDep, blobs: BlobsDep):
    """The adapter in PEFT's prefix-tuning format (`adapter_config.json` + `adapter_model.safetensors`),
    loadable with `PeftModel.from_pretrained` after unzipping."""

    record = _tenant_adapter(session, tenant.id, model_id, _served_of(request))
    if record.kind != "adapter":
        raise APIError(400, f"'{model_id}' is a base model; only adapters can be exported", param="model_id",
                       code="not_an_adapter")
    try:
        adapter = load_adapter_blob(blobs, record.blob_key)
    except KeyError:
        raise APIError(500, f"The stored adapter '{record.id}' is missing from storage", type="server_error",
                       code="adapter_missing") from None
    data = export_peft_zip(adapter, base_model_name_or_path=record.base_id)
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", record.id) + ".zip"
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/v1/models/{model_id:path}", response_model=ModelObject)
def get_model(model_id: str, request: Request, tenant: TenantDep, session: SessionDep) -> ModelObject:
    served = _served_of(request)
    record = visible_record(session, tenant.id, model_id, served)
    if record is None:
        raise not_found(model_id, None)
    return model_public(record, served)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, request: Request, tenant: TenantDep, session: SessionDep,
                 blobs: BlobsDep) -> ModelDeleted:
    record = session.get(ModelRecord, model_id)
    if record is None or record.tenant_id != tenant.id:
        raise not_found(model_id, None)
    if record.kind != "adapter":
        raise APIError(400, f"'{model_id}' is a base model; only adapters can be deleted", param="model_id",
                       code="not_an_adapter")
    jobs = session.scalars(select(Job).where(
        Job.tenant_id == tenant.id, Job.status.in_(ACTIVE_JOB_STATUSES))).all()
    users = [j.id for j in jobs if ((j.method or {}).get(j.kind) or {}).get("init_adapter") == model_id]
    if users:
        raise APIError(409, f"The adapter '{model_id}' is the init_adapter of active job(s) {', '.join(users)}; "
                            "cancel them or wait for them to finish", code="model_in_use", headers=NO_RETRY)
    key = record.blob_key

    def drop_row():  # on a full disk, with the reserve released if need be (app.store.storage)
        try:
            session.delete(record)
            session.commit()
        except BaseException:
            session.rollback()
            raise

    with_reserve(request.app.state.settings, drop_row)
    stop_broadcast.adapter_deleted(request.app, model_id)  # from the adapter cache of every replica
    try:
        if key.endswith("/"):
            blobs.delete_prefix(key)
        else:
            blobs.delete(key)
    except KeyError:
        pass
    return ModelDeleted(id=model_id)


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = await upload.read(1 << 20)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The zip is larger than the limit of {limit} bytes (MAX_ZIP_BYTES)",
                           param="file", code="file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/v1/models/import", response_model=ModelObject, status_code=201)
async def import_model(
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A zip of PEFT prefix-tuning files: adapter_config.json and "
                                                 "adapter_model.safetensors at its root")],
    suffix: Annotated[str | None, Form(description="Up to 40 characters of [a-z0-9-]")] = None,
) -> ModelObject:
    """Import a PEFT prefix-tuning adapter for the served base (shapes are checked against it)."""

    if suffix is not None and suffix != "" and not SUFFIX_RE.match(suffix):
        raise APIError(400, "suffix must be 1-40 characters of [a-z0-9-]", param="suffix", code="invalid_suffix")
    engine = get_engine(request)
    served = require_ready(engine)
    data = await _read_limited(file, settings.max_zip_bytes)
    limits = ZipLimits(
        max_archive_bytes=settings.max_zip_bytes,
        max_total_uncompressed=int(settings.max_zip_bytes * 2),
        max_entries=settings.max_zip_entries,
        max_ratio=settings.max_zip_ratio,
    )
    import_id = new_id("import")
    try:
        adapter = await run_in_threadpool(import_peft_zip, data, served.base, limits, imported_as=import_id)
    except AdapterFormatError as e:
        raise APIError(400, f"Not a usable PEFT prefix-tuning adapter for base '{served.id}': {e}",
                       param="file", code="invalid_adapter") from None
    if adapter.num_virtual_tokens > settings.max_num_virtual_tokens:
        raise APIError(400, f"num_virtual_tokens {adapter.num_virtual_tokens} is over the limit of "
                            f"{settings.max_num_virtual_tokens} (MAX_NUM_VIRTUAL_TOKENS)",
                       param="file", code="invalid_adapter")
    # 429 over the adapters quota: refused early, without a lock, before the blob is stored; the
    # binding check runs again below with the tenant locked, in the transaction that inserts the row
    await run_in_threadpool(_then_commit, session, check_adapter_count, session, tenant,
                            request.app.state.settings, lock=False)
    model_id = f"ft:{served.id}:{tenant.id}:{suffix or ''}:{import_id}"
    blob = adapter_to_bytes(adapter)
    key = f"adapters/{tenant.id}/{import_id}.zip"
    await run_in_threadpool(blobs.put_bytes, key, blob)
    record = ModelRecord(
        id=model_id, kind="adapter", tenant_id=tenant.id, base_id=served.id, fingerprint=served.fingerprint,
        blob_key=key, job_id=None, num_virtual_tokens=adapter.num_virtual_tokens, size_bytes=len(blob),
        details={"source": "peft-import", "filename": (file.filename or "")[:255]}, created_at=now(),
    )

    # in a worker thread: waiting for the tenant lock must not block the event loop
    await run_in_threadpool(
        insert_with_blob, session, record,
        lambda: check_adapter_count(session, tenant, request.app.state.settings, lock=True), blobs, key)
    return model_public(record, served)


def _then_commit(session, fn, *args, **kw):
    """fn(...) then end the session's transaction, so no connection is held across an await."""
    try:
        return fn(*args, **kw)
    finally:
        session.commit()
