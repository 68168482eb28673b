"""Pydantic schemas shared by the routers (a family per resource: XCreate, XPublic, XList).

Others may add their families here; keep `extra="forbid"` on request bodies so that an unknown
field is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic_core import PydanticCustomError

from app.api.errors import ErrorDetail, ErrorResponse  # noqa: F401  (re-exported)


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# printable text: no control characters (PostgreSQL refuses NUL; logs stay one line)
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


# ---- tenants and keys (admin) ----

class TenantCreate(StrictBody):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name


# a JSON integer (1.0 counts, as in JSON Schema; "1" and true do not: Quotas._numbers_only)
QuotaValue = Annotated[int, Field(ge=0, le=10**15)]


class Quotas(StrictBody):
    """Per-tenant quota overrides (defaults come from the settings); null removes an override.
    Extend as quotas land; the stored JSON keeps only the fields that were set."""

    storage_bytes: QuotaValue | None = None
    files: QuotaValue | None = None
    adapters: QuotaValue | None = None
    running_jobs: QuotaValue | None = None
    requests_per_minute: QuotaValue | None = None
    tokens_per_minute: QuotaValue | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_only(cls, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise PydanticCustomError("int_type", "Input should be a valid integer", {})
        return v


QUOTA_KEYS = tuple(Quotas.model_fields)


class TenantUpdate(StrictBody):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name | None = None
    suspended: bool | None = None
    quotas: Quotas | None = None


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int
    suspended: bool = False
    quotas: dict = Field(default_factory=dict)  # the overrides set by PATCH
    usage: dict | None = None  # GET/PATCH of one tenant: current use, a key per quota
    limits: dict | None = None  # GET/PATCH of one tenant: the effective quota (override or default; 0 = unlimited)


class TenantCreated(TenantPublic):
    api_key: str
    api_key_id: str


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantPublic]
    has_more: bool = False


class TenantDeleted(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    deleted: bool = True


class ApiKeyCreated(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    api_key: str
    created_at: int


class ApiKeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    created_at: int
    revoked_at: int | None = None


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyPublic]
    has_more: bool = False


class ApiKeyDeleted(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    deleted: bool = True


# ---- files ----

FilePurpose = Literal["fine-tune", "base-train", "evals", "fine-tune-results"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    # why validation failed; OpenAI's spec has it an optional string (deprecated), never null, so
    # a file without details (uploaded, processed) leaves the key out
    status_details: str | None = None
    # extensions: filled in when validation finishes
    row_count: int | None = None
    token_count: int | None = None

    @model_serializer(mode="wrap")
    def _omit_null_details(self, handler):
        out = handler(self)
        if out.get("status_details") is None:
            out.pop("status_details", None)
        return out


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    # required by OpenAI's ListFilesResponse; null only on an empty page
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ---- health ----

class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    # degraded: serving, but the storage is full (uploads and jobs wait; reads and deletes work)
    status: Literal["ready", "degraded", "not_ready"]
    checks: dict[str, str]
