"""Admin API (admin key only): tenants and their keys.

A new key is shown once, in the response that creates it; only its sha256 is stored.
Deleting a tenant removes its rows (files, jobs with their events and checkpoints, adapters, keys)
and its blobs (every `{kind}/{tenant_id}/` prefix plus each row's own blob key).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Request
from sqlalchemy import delete, func, select

from app.api.deps import AdminDep, BlobsDep, SessionDep, hash_key, new_api_key
from app.api.errors import bad_request, not_found
from app.api.schemas import (
    ApiKeyCreated,
    ApiKeyDeleted,
    ApiKeyList,
    ApiKeyPublic,
    TenantCreate,
    TenantCreated,
    TenantDeleted,
    TenantList,
    TenantPublic,
    TenantUpdate,
)
from app.store.ids import ID_PATTERN, is_valid_id
from app.store.tables import ApiKey, File, Job, JobCheckpoint, JobEvent, ModelRecord, Tenant, now
from app.tenancy import quotas, stop_broadcast

log = logging.getLogger("prefixd.admin")
router = APIRouter(prefix="/v1/admin", tags=["admin"])

TENANT_BLOB_PREFIXES = ("files", "adapters", "jobs", "checkpoints", "exports", "results")


def tenant_usage(session, tenant_id: str) -> dict:
    files, storage = session.execute(
        select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id)
    ).one()
    adapters = session.scalar(
        select(func.count(ModelRecord.id)).where(ModelRecord.tenant_id == tenant_id, ModelRecord.kind == "adapter"))
    running = session.scalar(
        select(func.count(Job.id)).where(Job.tenant_id == tenant_id, Job.status == "running"))
    return {"files": int(files), "storage_bytes": int(storage), "adapters": int(adapters or 0),
            "running_jobs": int(running or 0)}


def _public(t: Tenant, usage: dict | None = None, limits: dict | None = None) -> TenantPublic:
    return TenantPublic(id=t.id, name=t.name, created_at=t.created_at, suspended=bool(t.suspended),
                        quotas=dict(t.quotas or {}), usage=usage, limits=limits)


def _with_usage(request: Request, session, t: Tenant) -> TenantPublic:
    """The tenant with `usage` against each quota and `limits` (effective: override or default; 0 =
    unlimited). Request and token rates are the last 60 s: of every replica when the windows are in
    Redis, else of this API process (see app/tenancy/quotas.py)."""
    usage = tenant_usage(session, t.id)
    try:
        usage.update(quotas.limiter(request.app).usage(t.id))
    except quotas.RateLimiterUnavailable:
        pass  # Redis is down: show the stock usage; the admin change itself has been committed
    return _public(t, usage, quotas.effective_quotas(t, request.app.state.settings))


def _get_tenant(session, tenant_id: str) -> Tenant:
    t = session.get(Tenant, tenant_id) if is_valid_id(tenant_id) else None
    if t is None:
        raise not_found("tenant", tenant_id, param="tenant_id")
    return t


@router.post("/tenants", response_model=TenantCreated, status_code=201)
def create_tenant(body: TenantCreate, _: AdminDep, session: SessionDep) -> TenantCreated:
    tenant = Tenant(name=body.name, quotas={})
    session.add(tenant)
    session.flush()
    key = new_api_key()
    api_key = ApiKey(tenant_id=tenant.id, key_hash=hash_key(key))
    session.add(api_key)
    session.commit()
    log.info("created tenant %s", tenant.id)
    return TenantCreated(**_public(tenant).model_dump(), api_key=key, api_key_id=api_key.id)


@router.get("/tenants", response_model=TenantList)
def list_tenants(_: AdminDep, session: SessionDep, after: str | None = Query(default=None, pattern=ID_PATTERN),
                 limit: int = Query(default=100, ge=1, le=1000)) -> TenantList:
    q = select(Tenant).order_by(Tenant.id)
    if after:
        if not is_valid_id(after):
            raise bad_request("invalid cursor 'after'", param="after")
        q = q.where(Tenant.id > after)
    rows = session.scalars(q.limit(limit + 1)).all()
    return TenantList(data=[_public(t) for t in rows[:limit]], has_more=len(rows) > limit)


@router.get("/tenants/{tenant_id}", response_model=TenantPublic)
def get_tenant(tenant_id: str, request: Request, _: AdminDep, session: SessionDep) -> TenantPublic:
    t = _get_tenant(session, tenant_id)
    return _with_usage(request, session, t)


@router.patch("/tenants/{tenant_id}", response_model=TenantPublic)
def update_tenant(
    tenant_id: str, body: TenantUpdate, request: Request, _: AdminDep, session: SessionDep
) -> TenantPublic:
    """Rename, suspend/unsuspend, or set quota overrides (a null value removes an override)."""
    t = _get_tenant(session, tenant_id)
    if body.name is not None:
        t.name = body.name
    if body.suspended is not None:
        t.suspended = body.suspended
        if body.suspended:  # running jobs stop at their next step
            for job in session.scalars(
                select(Job).where(Job.tenant_id == t.id, Job.status.in_(("validating_files", "queued", "running")))
            ):
                job.cancel_requested = True
    if body.quotas is not None:
        quotas = dict(t.quotas or {})
        for k in body.quotas.model_fields_set:
            v = getattr(body.quotas, k)
            if v is None:
                quotas.pop(k, None)
            else:
                quotas[k] = v
        t.quotas = quotas
    session.commit()
    if body.suspended:  # requests already queued or running for a batch stop too, on every replica
        stop_broadcast.tenant_stopped(request.app, t.id)
    elif body.suspended is False:
        stop_broadcast.tenant_resumed(request.app, t.id)
    return _with_usage(request, session, t)


@router.delete("/tenants/{tenant_id}", response_model=TenantDeleted)
def delete_tenant(tenant_id: str, request: Request, _: AdminDep, session: SessionDep, blobs: BlobsDep) -> TenantDeleted:
    t = _get_tenant(session, tenant_id)
    keys: set[str] = set()
    keys.update(session.scalars(select(File.blob_key).where(File.tenant_id == t.id)))
    keys.update(k for k in session.scalars(select(ModelRecord.blob_key).where(ModelRecord.tenant_id == t.id)) if k)
    keys.update(k for k in session.scalars(select(JobCheckpoint.blob_key).where(JobCheckpoint.tenant_id == t.id)) if k)
    job_ids = select(Job.id).where(Job.tenant_id == t.id)
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id.in_(job_ids)))
    session.execute(delete(Job).where(Job.tenant_id == t.id))
    session.execute(delete(ModelRecord).where(ModelRecord.tenant_id == t.id))
    session.execute(delete(File).where(File.tenant_id == t.id))
    session.execute(delete(ApiKey).where(ApiKey.tenant_id == t.id))
    session.delete(t)
    session.commit()
    # blobs after the rows: a crash in between leaves orphan blobs, never rows without blobs
    for key in sorted(keys):
        try:
            blobs.delete_prefix(key.rstrip("/") + "/")
            blobs.delete(key.rstrip("/"))
        except Exception:  # noqa: BLE001 - best effort; logged
            log.warning("could not delete blob %s of tenant %s", key, t.id, exc_info=True)
    for kind in TENANT_BLOB_PREFIXES:
        try:
            blobs.delete_prefix(f"{kind}/{t.id}/")
        except Exception:  # noqa: BLE001
            log.warning("could not delete blobs %s/%s/", kind, t.id, exc_info=True)
    # cancels its requests and evicts its adapters from the serving cache, here and on every replica
    stop_broadcast.tenant_stopped(request.app, t.id, deleted=True)
    log.info("deleted tenant %s", t.id)
    return TenantDeleted(id=t.id)


@router.post("/tenants/{tenant_id}/keys", response_model=ApiKeyCreated, status_code=201)
def create_key(tenant_id: str, _: AdminDep, session: SessionDep) -> ApiKeyCreated:
    t = _get_tenant(session, tenant_id)
    key = new_api_key()
    row = ApiKey(tenant_id=t.id, key_hash=hash_key(key))
    session.add(row)
    session.commit()
    return ApiKeyCreated(id=row.id, api_key=key, created_at=row.created_at)


@router.get("/tenants/{tenant_id}/keys", response_model=ApiKeyList)
def list_keys(tenant_id: str, _: AdminDep, session: SessionDep) -> ApiKeyList:
    t = _get_tenant(session, tenant_id)
    rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == t.id).order_by(ApiKey.created_at, ApiKey.id))
    return ApiKeyList(data=[ApiKeyPublic(id=r.id, created_at=r.created_at, revoked_at=r.revoked_at) for r in rows])


@router.delete("/tenants/{tenant_id}/keys/{key_id}", response_model=ApiKeyDeleted)
def revoke_key(tenant_id: str, key_id: str, request: Request, _: AdminDep, session: SessionDep) -> ApiKeyDeleted:
    t = _get_tenant(session, tenant_id)
    row = (
        session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == t.id))
        if is_valid_id(key_id)
        else None
    )
    if row is None:
        raise not_found("key", key_id, param="key_id")
    if row.revoked_at is None:
        row.revoked_at = now()
    session.commit()
    # requests made with it stop at once, on every replica (app/tenancy/stop_broadcast.py): those queued or
    # running now, and (through recently_stopped) those authenticated before the commit that reach
    # the engine after this call
    stop_broadcast.key_revoked(request.app, row.key_hash)
    return ApiKeyDeleted(id=row.id)
