"""OpenAI's Evals API: `/v1/evals`, their runs and the runs' output items, in OpenAI's shapes.

The definitions are checked by the pure core (`app.evals`: `validate_eval`, `parse_input_messages`,
`validate_rows`), whose `EvalSpecError(message, param)` is a 400 naming the field. A run is checked
whole before anything is written: its model and file must be the tenant's (or a shared base), and
every row of its data source must match the eval's item_schema (a bad row is reported by its line
number). Then the run is committed `queued` and its id is sent to the workers
(`worker.tasks.run_eval` -> `app.evals.runner.run_eval`).

Lists are cursor pages as OpenAI's are: `after` (an id of the previous page), `limit` (1..100),
`order` (`asc` | `desc`), and `{data, first_id, last_id, has_more}`. Cancelling a run is
`POST /v1/evals/{eval_id}/runs/{run_id}/cancel` (the official client's path) or OpenAI's
documented `POST /v1/evals/{eval_id}/runs/{run_id}`.

Ours, beside OpenAI's fields of a run (docs/EVALS.md, docs/EXTENSIONS.md): `base_model` and
`base_result_counts` / `base_per_testing_criteria_results` (an adapter's run also grades the
adapter's base in the same batches), `per_testing_criteria_metrics` (and the base's), and
`progress`; on output items, `base_status`, `base_results` and `base_sample`.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Body, Path, Query, Request
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.errors import APIError
from app.api.jobs import _ctx
from app.evals import (
    EvalSpec,
    EvalSpecError,
    content_rows,
    dispatch,
    jsonl_rows,
    parse_input_messages,
    validate_eval,
    validate_rows,
)
from app.store.eval_tables import EvalRecord, EvalRunOutputItemRecord, EvalRunRecord
from app.store.tables import File, ModelRecord, now

log = logging.getLogger("prefixd.api.evals")

router = APIRouter(prefix="/v1/evals", tags=["evals"])

MAX_PAGE = 100
RUN_STATUSES = ("queued", "in_progress", "completed", "failed", "canceled")
ACTIVE_RUN = ("queued", "in_progress")
EVAL_FILE_PURPOSE = "evals"
# OpenAI's defaults for a completions run's sampling_params
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "seed": 42}
DEFAULT_MAX_COMPLETION_TOKENS = 64

EvalId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
RunId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ItemId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
After = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                                    description="An id of the previous page: the page after it")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Order = Annotated[Literal["asc", "desc"], Query()]


def spec_error(e: EvalSpecError) -> APIError:
    return APIError(400, e.message, param=e.param, code="invalid_request")


# ----------------------------------------------------------------------------- bodies


def _metadata(value: Any, param: str = "metadata") -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "metadata must be an object of string values", param=param)
    if len(value) > 16:
        raise APIError(400, f"metadata has {len(value)} keys; at most 16", param=param)
    for k, v in value.items():
        if len(k) > 64:
            raise APIError(400, "metadata keys are at most 64 characters", param=f"{param}.{k[:64]}")
        if not isinstance(v, str) or len(v) > 512:
            raise APIError(400, "metadata values are strings of at most 512 characters", param=f"{param}.{k}")
    return dict(value)


def _name(value: Any, param: str = "name") -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 256:
        raise APIError(400, "name must be a string of at most 256 characters", param=param)
    return value


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_request")
    return body


def _unknown(body: dict, allowed: set[str], prefix: str = "") -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise APIError(400, f"Unknown parameter: '{prefix}{extra[0]}'", param=f"{prefix}{extra[0]}",
                       code="unknown_parameter")


def _number(value: Any, param: str, lo: float, hi: float, *, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise APIError(400, f"{param} must be {what} from {lo:g} to {hi:g}", param=param)
    return value


def sampling_params(obj: Any, settings) -> dict[str, Any]:
    p = "data_source.sampling_params"
    obj = {} if obj is None else obj
    if not isinstance(obj, dict):
        raise APIError(400, "sampling_params must be an object", param=p)
    _unknown(obj, {"temperature", "top_p", "seed", "max_completion_tokens"}, f"{p}.")
    out = dict(DEFAULT_SAMPLING)
    out["max_completion_tokens"] = min(DEFAULT_MAX_COMPLETION_TOKENS, settings.max_completion_tokens)
    if obj.get("temperature") is not None:
        out["temperature"] = float(_number(obj["temperature"], f"{p}.temperature", 0, 2))
    if obj.get("top_p") is not None:
        out["top_p"] = float(_number(obj["top_p"], f"{p}.top_p", 1e-8, 1))
    if obj.get("seed") is not None:
        out["seed"] = int(_number(obj["seed"], f"{p}.seed", -(2**63), 2**63 - 1, integer=True))
    if obj.get("max_completion_tokens") is not None:
        out["max_completion_tokens"] = int(_number(obj["max_completion_tokens"], f"{p}.max_completion_tokens",
                                                   1, settings.max_completion_tokens, integer=True))
    return out


# ----------------------------------------------------------------------------- views


def eval_public(e: EvalRecord) -> dict:
    # from the stored definition as it is: a GET never re-validates (nor fails on) an eval
    cfg = e.data_source_config
    spec = EvalSpec(cfg["item_schema"], bool(cfg.get("include_sample_schema")), ())
    return {"object": "eval", "id": e.id, "name": e.name, "created_at": e.created_at,
            "metadata": e.user_metadata, "data_source_config": spec.response_data_source_config(),
            "testing_criteria": e.testing_criteria}


def _empty_summary(criteria: list[dict]) -> dict:
    return {"result_counts": {"total": 0, "passed": 0, "failed": 0, "errored": 0},
            "per_testing_criteria_results": [{"testing_criteria": c["name"], "passed": 0, "failed": 0}
                                             for c in criteria],
            "per_testing_criteria_metrics": None}


def run_public(r: EvalRunRecord, criteria: list[dict], request: Request | None = None) -> dict:
    summary = r.summary or _empty_summary(criteria)
    out = {
        "object": "eval.run", "id": r.id, "eval_id": r.eval_id, "status": r.status, "model": r.model,
        "name": r.name, "created_at": r.created_at,
        "report_url": (str(request.base_url).rstrip("/") if request is not None else "")
                      + f"/v1/evals/{r.eval_id}/runs/{r.id}",
        "result_counts": summary["result_counts"],
        "per_model_usage": r.per_model_usage or [],
        "per_testing_criteria_results": summary["per_testing_criteria_results"],
        "data_source": r.data_source, "metadata": r.user_metadata, "error": r.error,
        # ours
        "progress": {"completed_items": summary["result_counts"]["total"], "total_items": r.items_total},
        "per_testing_criteria_metrics": summary.get("per_testing_criteria_metrics"),
        "base_model": None,
    }
    if r.base_summary is not None:
        out.update(base_model=r.base_summary.get("model"),
                   base_result_counts=r.base_summary["result_counts"],
                   base_per_testing_criteria_results=r.base_summary["per_testing_criteria_results"],
                   base_per_testing_criteria_metrics=r.base_summary.get("per_testing_criteria_metrics"))
    return out


def item_public(it: EvalRunOutputItemRecord) -> dict:
    out = {"object": "eval.run.output_item", "id": it.id, "run_id": it.run_id, "eval_id": it.eval_id,
           "created_at": it.created_at, "status": it.status, "datasource_item_id": it.datasource_item_id,
           "datasource_item": it.datasource_item, "results": it.results, "sample": it.sample}
    if it.base_status is not None:
        out.update(base_status=it.base_status, base_results=it.base_results, base_sample=it.base_sample)
    return out


def _page(session: Session, q, model, col, after_row, order: str, limit: int, view) -> dict:
    desc = order == "desc"
    if after_row is not None:
        v, i = getattr(after_row, col.key), after_row.id
        q = q.where(or_(col < v, (col == v) & (model.id < i)) if desc else or_(col > v, (col == v) & (model.id > i)))
    q = q.order_by(col.desc(), model.id.desc()) if desc else q.order_by(col.asc(), model.id.asc())
    rows = list(session.scalars(q.limit(limit + 1)))
    data = [view(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


# ----------------------------------------------------------------------------- lookups


def get_eval(session: Session, tenant_id: str, eval_id: str) -> EvalRecord:
    e = session.scalar(select(EvalRecord).where(EvalRecord.id == eval_id, EvalRecord.tenant_id == tenant_id))
    if e is None:
        raise APIError(404, f"No such eval: '{eval_id}'", param="eval_id", code="not_found")
    return e


def get_run(session: Session, tenant_id: str, eval_id: str, run_id: str) -> EvalRunRecord:
    r = session.scalar(select(EvalRunRecord).where(EvalRunRecord.id == run_id, EvalRunRecord.eval_id == eval_id,
                                                   EvalRunRecord.tenant_id == tenant_id))
    if r is None:
        raise APIError(404, f"No such eval run: '{run_id}'", param="run_id", code="not_found")
    return r


def _cursor(session: Session, model, after: str | None, *where) -> Any:
    if after is None:
        return None
    row = session.scalar(select(model).where(model.id == after, *where))
    if row is None:
        raise APIError(400, f"Unknown cursor: '{after}'", param="after", code="invalid_cursor")
    return row


def visible_model(session: Session, tenant_id: str, model_id: Any) -> ModelRecord:
    """The tenant's adapter or a base it may use; another tenant's model does not exist for it."""
    param = "data_source.model"
    if not isinstance(model_id, str) or not model_id:
        raise APIError(400, f"Missing required parameter: '{param}'", param=param)
    rec = session.scalar(select(ModelRecord).where(
        ModelRecord.id == model_id, or_(ModelRecord.tenant_id.is_(None), ModelRecord.tenant_id == tenant_id)))
    if rec is None:
        raise APIError(404, f"The model '{model_id}' does not exist", param=param, code="model_not_found")
    return rec


# ----------------------------------------------------------------------------- enqueue


def _send(request: Request, run_id: str) -> None:
    """Hand the run to the workers right after its commit, best effort: a run the broker did not
    take stays queued and the job monitor sends it (app.evals.dispatch)."""

    dispatch.relay_soon(_ctx(request), [run_id])


# ----------------------------------------------------------------------------- evals


@router.post("", summary="Create an eval")
def create_eval(body: Annotated[Any, Body()], tenant: TenantDep, session: SessionDep) -> dict:
    body = _object(body)
    _unknown(body, {"name", "metadata", "data_source_config", "testing_criteria"})
    try:
        spec = validate_eval(body.get("data_source_config"), body.get("testing_criteria"))
    except EvalSpecError as e:
        raise spec_error(e) from None
    e = EvalRecord(tenant_id=tenant.id, name=_name(body.get("name")), user_metadata=_metadata(body.get("metadata")),
                   data_source_config=spec.data_source_config(), testing_criteria=spec.testing_criteria())
    session.add(e)
    session.commit()
    return eval_public(e)


@router.get("", summary="List evals")
def list_evals(tenant: TenantDep, session: SessionDep, after: After = None, limit: Limit = 20,
               order: Order = "asc", order_by: Annotated[Literal["created_at", "updated_at"], Query()] = "created_at"
               ) -> dict:
    col = EvalRecord.created_at if order_by == "created_at" else EvalRecord.updated_at
    cur = _cursor(session, EvalRecord, after, EvalRecord.tenant_id == tenant.id)
    q = select(EvalRecord).where(EvalRecord.tenant_id == tenant.id)
    return _page(session, q, EvalRecord, col, cur, order, limit, eval_public)


@router.get("/{eval_id}", summary="Get an eval")
def retrieve_eval(eval_id: EvalId, tenant: TenantDep, session: SessionDep) -> dict:
    return eval_public(get_eval(session, tenant.id, eval_id))


@router.post("/{eval_id}", summary="Update an eval's name or metadata")
def update_eval(eval_id: EvalId, body: Annotated[Any, Body()], tenant: TenantDep, session: SessionDep) -> dict:
    body = _object(body)
    _unknown(body, {"name", "metadata"})
    e = get_eval(session, tenant.id, eval_id)
    if "name" in body and body["name"] is not None:
        e.name = _name(body["name"])
    if "metadata" in body:
        e.user_metadata = _metadata(body["metadata"])
    e.updated_at = now()
    session.commit()
    return eval_public(e)


@router.delete("/{eval_id}", summary="Delete an eval and its runs")
def delete_eval(eval_id: EvalId, tenant: TenantDep, session: SessionDep) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    # runs still going stop at their next batch: their row is gone
    session.execute(delete(EvalRunRecord).where(EvalRunRecord.eval_id == e.id, EvalRunRecord.tenant_id == tenant.id))
    session.delete(e)
    session.commit()
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# ----------------------------------------------------------------------------- runs


def _source_rows(session: Session, tenant_id: str, source: Any, request: Request):
    """(normalised source, a function returning fresh (line, item) rows) of a run's data source."""
    p = "data_source.source"
    if not isinstance(source, dict):
        raise APIError(400, f"Missing required parameter: '{p}'", param=p)
    kind = source.get("type")
    if kind == "file_content":
        _unknown(source, {"type", "content"}, f"{p}.")
        content = source.get("content")
        if not isinstance(content, list):
            raise APIError(400, "content must be a list of {\"item\": {...}} rows", param=f"{p}.content")
        return {"type": "file_content", "content": content}, lambda: content_rows(content, f"{p}.content")
    if kind == "file_id":
        _unknown(source, {"type", "id"}, f"{p}.")
        fid = source.get("id")
        if not isinstance(fid, str) or not fid:
            raise APIError(400, f"Missing required parameter: '{p}.id'", param=f"{p}.id")
        f = session.scalar(select(File).where(File.id == fid, File.tenant_id == tenant_id))
        if f is None:
            raise APIError(404, f"No such file: '{fid}'", param=f"{p}.id", code="not_found")
        if f.purpose != EVAL_FILE_PURPOSE:
            raise APIError(400, f"File {fid} has purpose '{f.purpose}'; an eval run reads files of purpose "
                           f"'{EVAL_FILE_PURPOSE}'", param=f"{p}.id", code="invalid_file_purpose")
        if f.status == "error":
            raise APIError(400, f"File {fid} failed validation: {(f.status_details or '')[:500]}",
                           param=f"{p}.id", code="invalid_file")
        blobs, key = request.app.state.blobs, f.blob_key

        def rows():
            with blobs.open(key) as fh:  # line by line: never the whole file in memory
                yield from jsonl_rows(fh)
        return {"type": "file_id", "id": fid}, rows
    raise APIError(400, f"source type must be 'file_id' or 'file_content', got {kind!r}", param=f"{p}.type")


@router.post("/{eval_id}/runs", summary="Create an eval run")
def create_run(eval_id: EvalId, body: Annotated[Any, Body()], request: Request, background: BackgroundTasks,
               tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> dict:
    body = _object(body)
    _unknown(body, {"name", "metadata", "data_source"})
    e = get_eval(session, tenant.id, eval_id)
    ds = body.get("data_source")
    if not isinstance(ds, dict):
        raise APIError(400, "Missing required parameter: 'data_source'", param="data_source")
    kind = ds.get("type")
    if kind != "completions":
        raise APIError(400, f"data_source type {kind!r} is not supported: only 'completions' (the server "
                       "generates each item's sample with `model`)", param="data_source.type")
    _unknown(ds, {"type", "model", "source", "input_messages", "sampling_params"}, "data_source.")
    name, metadata = _name(body.get("name")), _metadata(body.get("metadata"))
    model = visible_model(session, tenant.id, ds.get("model"))
    try:
        spec = validate_eval(e.data_source_config, e.testing_criteria)
        parse_input_messages(ds.get("input_messages"), spec.item_schema)
    except EvalSpecError as err:
        raise spec_error(err) from None
    sampling = sampling_params(ds.get("sampling_params"), settings)
    source, rows = _source_rows(session, tenant.id, ds.get("source"), request)
    session.commit()  # no read transaction (and no connection) while the rows stream
    try:
        total = validate_rows(rows(), spec.item_schema, param="data_source.source")
    except EvalSpecError as err:
        raise spec_error(err) from None
    data_source = {"type": "completions", "model": model.id, "source": source,
                   "input_messages": ds["input_messages"], "sampling_params": sampling}
    run = EvalRunRecord(eval_id=e.id, tenant_id=tenant.id, name=name or f"{model.id} on {e.name or e.id}",
                        model=model.id, status="queued", data_source=data_source, user_metadata=metadata,
                        items_total=total)
    session.add(run)
    session.commit()
    background.add_task(_send, request, run.id)
    return run_public(run, e.testing_criteria, request)


@router.get("/{eval_id}/runs", summary="List an eval's runs")
def list_runs(eval_id: EvalId, request: Request, tenant: TenantDep, session: SessionDep, after: After = None,
              limit: Limit = 20, order: Order = "asc",
              status: Annotated[Literal["queued", "in_progress", "completed", "failed", "canceled"] | None,
                                Query()] = None) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    where = [EvalRunRecord.eval_id == e.id, EvalRunRecord.tenant_id == tenant.id]
    cur = _cursor(session, EvalRunRecord, after, *where)
    q = select(EvalRunRecord).where(*where)
    if status is not None:
        q = q.where(EvalRunRecord.status == status)
    return _page(session, q, EvalRunRecord, EvalRunRecord.created_at, cur, order, limit,
                 lambda r: run_public(r, e.testing_criteria, request))


@router.get("/{eval_id}/runs/{run_id}", summary="Get an eval run")
def retrieve_run(eval_id: EvalId, run_id: RunId, request: Request, tenant: TenantDep, session: SessionDep) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    return run_public(get_run(session, tenant.id, e.id, run_id), e.testing_criteria, request)


def _cancel(eval_id: str, run_id: str, request: Request, tenant, session: Session) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    run = get_run(session, tenant.id, e.id, run_id)
    # a compare-and-set: the worker's writes match on in_progress, so it stops at its next batch
    session.execute(update(EvalRunRecord).where(EvalRunRecord.id == run.id, EvalRunRecord.status.in_(ACTIVE_RUN))
                    .values(status="canceled", finished_at=now()).execution_options(synchronize_session=False))
    session.commit()
    session.refresh(run)
    return run_public(run, e.testing_criteria, request)


@router.post("/{eval_id}/runs/{run_id}/cancel", summary="Cancel an eval run")
def cancel_run(eval_id: EvalId, run_id: RunId, request: Request, tenant: TenantDep, session: SessionDep) -> dict:
    """Queued: canceled at once. In progress: the worker stops after the batch it is decoding. A
    finished run is answered as it is."""
    return _cancel(eval_id, run_id, request, tenant, session)


@router.post("/{eval_id}/runs/{run_id}", summary="Cancel an eval run (OpenAI's documented path)")
def cancel_run_documented(eval_id: EvalId, run_id: RunId, request: Request, tenant: TenantDep,
                          session: SessionDep) -> dict:
    return _cancel(eval_id, run_id, request, tenant, session)


@router.delete("/{eval_id}/runs/{run_id}", summary="Delete an eval run and its output items")
def delete_run(eval_id: EvalId, run_id: RunId, tenant: TenantDep, session: SessionDep) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    run = get_run(session, tenant.id, e.id, run_id)
    session.delete(run)
    session.commit()
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# ----------------------------------------------------------------------------- output items


@router.get("/{eval_id}/runs/{run_id}/output_items", summary="List a run's output items")
def list_output_items(eval_id: EvalId, run_id: RunId, tenant: TenantDep, session: SessionDep, after: After = None,
                      limit: Limit = 20, order: Order = "asc",
                      status: Annotated[Literal["pass", "fail", "error"] | None, Query()] = None) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    run = get_run(session, tenant.id, e.id, run_id)
    where = [EvalRunOutputItemRecord.run_id == run.id, EvalRunOutputItemRecord.tenant_id == tenant.id]
    cur = _cursor(session, EvalRunOutputItemRecord, after, *where)
    q = select(EvalRunOutputItemRecord).where(*where)
    if status is not None:
        q = q.where(EvalRunOutputItemRecord.status == status)
    return _page(session, q, EvalRunOutputItemRecord, EvalRunOutputItemRecord.seq, cur, order, limit, item_public)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", summary="Get an output item")
def retrieve_output_item(eval_id: EvalId, run_id: RunId, output_item_id: ItemId, tenant: TenantDep,
                         session: SessionDep) -> dict:
    e = get_eval(session, tenant.id, eval_id)
    run = get_run(session, tenant.id, e.id, run_id)
    it = session.scalar(select(EvalRunOutputItemRecord).where(
        EvalRunOutputItemRecord.id == output_item_id, EvalRunOutputItemRecord.run_id == run.id,
        EvalRunOutputItemRecord.tenant_id == tenant.id))
    if it is None:
        raise APIError(404, f"No such output item: '{output_item_id}'", param="output_item_id", code="not_found")
    return item_public(it)
