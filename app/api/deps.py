"""Dependencies as `Annotated` aliases: SettingsDep, SessionDep, BlobsDep, TenantDep, AdminDep.

Auth is `Authorization: Bearer <key>`.
- Tenant keys are `sk-` + `secrets.token_urlsafe(32)`, stored only as their sha256 hex; a key is
  found by a unique lookup on that hash (so comparison never touches the secret itself), checked
  on every request (a revoked key stops at once).
- The admin key comes from `ADMIN_API_KEY`. In embedded mode, if unset, one is generated on first
  start, written to `DATA_DIR/admin_key` (mode 0600) and printed once; later starts reuse it.
  In distributed mode with no `ADMIN_API_KEY` the admin API is disabled (every call 401).
- No key or an unknown key: 401. A tenant key on `/v1/admin/*`: 403. The admin key on a tenant
  route: 403 (it names no tenant). A suspended tenant's key: 403.
Keys never appear in logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.errors import APIError
from app.config import Settings
from app.store.blobs import BlobStore
from app.store.tables import ApiKey, Tenant

log = logging.getLogger("prefixd.auth")

ADMIN_KEY_FILE = "admin_key"


def new_api_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def load_or_create_admin_key(settings: Settings) -> tuple[str | None, bool]:
    """(admin key, generated now). Reads DATA_DIR/admin_key in embedded mode; creates it if missing."""
    if settings.admin_api_key:
        return settings.admin_api_key, False
    if not settings.embedded:
        return None, False
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-admin-" + secrets.token_urlsafe(32)
    try:  # O_EXCL: two processes starting at once agree on one key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, True


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _no_key() -> APIError:
    return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                    code="missing_api_key", headers=_AUTH_HEADERS)


def _bad_key() -> APIError:
    return APIError(401, "Incorrect API key provided", "authentication_error", code="invalid_api_key",
                    headers=_AUTH_HEADERS)


def _is_admin(request: Request, token: str) -> bool:
    admin = getattr(request.app.state, "admin_key", None)
    return bool(admin) and hmac.compare_digest(hash_key(token), hash_key(admin))


def lookup_tenant(session: Session, token: str) -> Tenant | None:
    """The tenant whose live key this is, or None. Lookup by the key's sha256, never by the key."""
    row = session.execute(
        select(Tenant, ApiKey)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None))
    ).first()
    return row[0] if row else None


def get_tenant(request: Request, session: SessionDep) -> Tenant:
    token = bearer_token(request)
    if token is None:
        raise _no_key()
    tenant = lookup_tenant(session, token)
    if tenant is None:
        if _is_admin(request, token):
            raise APIError(403, "The admin key cannot be used on tenant routes; use a tenant key",
                           "permission_error", code="admin_key_not_allowed")
        raise _bad_key()
    if tenant.suspended:
        raise APIError(403, "This tenant is suspended", "permission_error", code="tenant_suspended")
    request.state.tenant_id = tenant.id
    # end the read transaction: its pooled connection goes back now, not when the route ends. A route
    # that awaits (a thread-pool slot, generation) must not hold one, or a few hundred concurrent
    # requests exhaust the pool and time out with 500s. The route's next query checks one out again;
    # sessions do not expire on commit, so `tenant` stays loaded.
    session.commit()
    return tenant


def require_admin(request: Request, session: SessionDep) -> None:
    token = bearer_token(request)
    if token is None:
        raise _no_key()
    if _is_admin(request, token):
        return None
    if lookup_tenant(session, token) is not None:
        raise APIError(403, "Admin routes need the admin key", "permission_error", code="admin_only")
    raise _bad_key()


TenantDep = Annotated[Tenant, Depends(get_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
