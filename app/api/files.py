"""Files: upload (multipart `file` + `purpose`), list, get, content, delete. OpenAI shapes.

The body is limited while it streams (see `app/api/middleware.py`); the multipart parser spools
the part to a temporary file (never the whole body in memory), and the file's exact size is
checked against `MAX_UPLOAD_BYTES` before it is stored under `files/{tenant_id}/{file_id}`.
Validation runs after the response, in a worker thread: `uploaded` -> `processed` | `error`.
An upload has exactly one `file` part and one `purpose` part: a repeated one is a 400 naming it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Form, Query, Request, UploadFile
from fastapi import File as FileParam
from fastapi.responses import StreamingResponse
from sqlalchemy import and_, or_, select

from app.api.deps import BlobsDep, SessionDep, SettingsDep, TenantDep
from app.api.errors import APIError, not_found
from app.api.schemas import FileDeleted, FileList, FileObject
from app.files.processing import validate_stored_file
from app.store.ids import ID_PATTERN, is_valid_id
from app.store.storage import ensure_reserve, storage_errors, with_reserve
from app.store.tables import File, Job, new_id
from app.tenancy import quotas

log = logging.getLogger("prefixd.files")
router = APIRouter(prefix="/v1/files", tags=["files"])

LIST_PURPOSES = ("fine-tune", "base-train", "evals", "fine-tune-results")  # results: CSVs written by jobs
UploadPurpose = Literal["fine-tune", "base-train", "evals"]
ListPurpose = Literal["fine-tune", "base-train", "evals", "fine-tune-results"]
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


def file_object(f: File) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose,
                      status=f.status, status_details=f.status_details, row_count=f.row_count,
                      token_count=f.token_count)


def get_tenant_file(session, tenant_id: str, file_id: str) -> File:
    """A tenant's file, or 404 (another tenant's file does not exist for this one)."""
    f = (
        session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
        if is_valid_id(file_id)
        else None
    )
    if f is None:
        raise not_found("file", file_id, param="file_id")
    return f


def _clean_filename(name: str | None) -> str:
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:255].strip()
    return name or "upload"


# ---- validation (after the response) ----


def token_counter(app):
    """The served base's tokenizer when the engine exposes one, else None (bytes/4 estimate)."""
    serving = getattr(app.state, "serving", None)
    tok = getattr(serving, "tokenizer", None)
    if tok is None:  # ServingEngine.served -> ServedBase(base=app.ml.base.Base(tokenizer=...))
        try:
            served = getattr(serving, "served", None)
            tok = getattr(getattr(served, "base", None), "tokenizer", None)
        except Exception:  # noqa: BLE001
            tok = None
    if tok is None or not callable(tok):
        return None

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def validate_file(app, file_id: str) -> None:
    """Validate one stored file with the served tokenizer and record the outcome; never raises."""
    st = app.state
    validate_stored_file(st.settings, st.session_factory, st.blobs, file_id, token_counter(app))


def revalidate_pending(app) -> None:
    """At startup: files left `uploaded` by a crash get validated (in a daemon thread)."""

    def run():
        try:
            with app.state.session_factory() as session:
                ids = list(session.scalars(select(File.id).where(File.status == "uploaded")))
            for fid in ids:
                validate_file(app, fid)
        except Exception:  # noqa: BLE001
            log.exception("revalidation at startup failed")

    threading.Thread(target=run, name="revalidate-files", daemon=True).start()


# ---- routes ----


async def single_parts(request: Request) -> None:
    """400 for an upload that repeats `file` or `purpose`: the form would keep only the last one,
    storing a file the client did not mean (or did not know it sent). FastAPI has parsed the form
    before dependencies run; `request.form()` returns that parse."""
    form = await request.form()
    for name in ("file", "purpose"):
        count = len(form.getlist(name))
        if count > 1:
            raise APIError(400, f"Send one '{name}' part per upload, got {count}", param=name)


@router.post("", response_model=FileObject)
def upload_file(
    request: Request,
    tenant: TenantDep,
    _one_each: Annotated[None, Depends(single_parts)],
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    background: BackgroundTasks,
    file: Annotated[UploadFile, FileParam(description="the dataset")],
    purpose: Annotated[UploadPurpose, Form(description="fine-tune (JSONL), base-train (.txt or JSONL of text) "
                                           "or evals (JSONL of {\"item\": ...} rows)")],
) -> FileObject:
    fh = file.file
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    if size > settings.max_upload_bytes:
        raise APIError(
            413,
            f"File too large: {size} bytes (limit {settings.max_upload_bytes})",
            param="file",
            code="file_too_large",
        )
    # 429 over the files / storage_bytes quota. This first check takes no lock, so a tenant over its
    # quota is refused before any bytes are stored; the binding check is the locked one below.
    quotas.check_upload(session, tenant, settings, size, lock=False)
    session.commit()  # end the read transaction: no connection is held while the blob is written
    file_id = new_id("file")
    key = f"files/{tenant.id}/{file_id}"
    with storage_errors():  # a full disk: 507 storage_full, whatever the store raised
        blobs.put_stream(key, fh)
    row = File(
        id=file_id,
        tenant_id=tenant.id,
        filename=_clean_filename(file.filename),
        purpose=purpose,
        bytes=size,
        status="uploaded",
        blob_key=key,
    )
    # check again with the tenant locked, and insert in the same transaction
    quotas.insert_with_blob(
        session, row, lambda: quotas.check_upload(session, tenant, settings, size, lock=True), blobs, key
    )
    background.add_task(validate_file, request.app, file_id)
    return file_object(row)


@router.get("", response_model=FileList)
def list_files(
    tenant: TenantDep,
    session: SessionDep,
    purpose: ListPurpose | None = None,
    after: str | None = Query(
        default=None, pattern=ID_PATTERN, description="cursor: the last file id of the previous page"
    ),
    limit: int = Query(default=10000, ge=1, le=10000),
    order: str = Query(default="desc", pattern="^(asc|desc)$"),
) -> FileList:
    q = select(File).where(File.tenant_id == tenant.id)
    if purpose:
        q = q.where(File.purpose == purpose)
    desc = order == "desc"
    if after:
        cur = (
            session.scalar(select(File).where(File.id == after, File.tenant_id == tenant.id))
            if is_valid_id(after)
            else None
        )
        if cur is None:
            raise not_found("file", after, param="after")
        if desc:
            q = q.where(
                or_(File.created_at < cur.created_at, and_(File.created_at == cur.created_at, File.id < cur.id))
            )
        else:
            q = q.where(
                or_(File.created_at > cur.created_at, and_(File.created_at == cur.created_at, File.id > cur.id))
            )
    q = q.order_by(File.created_at.desc(), File.id.desc()) if desc else q.order_by(File.created_at, File.id)
    rows = session.scalars(q.limit(limit + 1)).all()
    shown = rows[:limit]
    return FileList(
        data=[file_object(f) for f in shown],
        has_more=len(rows) > limit,
        first_id=shown[0].id if shown else None,
        last_id=shown[-1].id if shown else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, tenant: TenantDep, session: SessionDep) -> FileObject:
    return file_object(get_tenant_file(session, tenant.id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}},
)
def file_content(file_id: str, tenant: TenantDep, session: SessionDep, blobs: BlobsDep):
    f = get_tenant_file(session, tenant.id, file_id)
    try:
        fh = blobs.open(f.blob_key)
    except KeyError:
        raise not_found("file content", file_id, param="file_id") from None

    def chunks():
        try:
            while True:
                b = fh.read(64 * 1024)
                if not b:
                    return
                yield b
        finally:
            fh.close()

    media = "text/csv" if f.filename.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str, tenant: TenantDep, session: SessionDep, blobs: BlobsDep, settings: SettingsDep
) -> FileDeleted:
    f = get_tenant_file(session, tenant.id, file_id)
    in_use = session.scalar(
        select(Job.id)
        .where(
            Job.tenant_id == tenant.id,
            or_(Job.training_file == f.id, Job.validation_file == f.id),
            Job.status.in_(ACTIVE_JOB_STATUSES),
        )
        .limit(1)
    )
    if in_use:
        raise APIError(
            409,
            f"File '{f.id}' is used by job '{in_use}', which is still active; cancel the job or wait for it to finish",
            param="file_id",
            code="file_in_use",
            headers={"x-should-retry": "false"},
        )
    delete_file_row_and_blob(session, settings, blobs, f)
    return FileDeleted(id=file_id)


def delete_file_row_and_blob(session, settings, blobs, f: File) -> None:
    """The blob goes first: on a full disk its space is what lets the database record the
    delete, and a delete that fails after it leaves a row whose content is gone (404), which the
    next DELETE removes. If the disk is still full the reserve is released for the row
    (`app.store.storage`), and made again once the delete freed room."""
    try:
        blobs.delete(f.blob_key)
    except Exception:  # noqa: BLE001 - the row still goes; an orphan blob is swept later
        log.warning("could not delete blob of file %s", f.id, exc_info=True)

    def drop_row():
        try:
            session.delete(f)
            session.commit()
        except BaseException:
            session.rollback()
            raise

    with_reserve(settings, drop_row)
    ensure_reserve(settings)
