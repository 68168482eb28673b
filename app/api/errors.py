"""The OpenAI error envelope, everywhere.

`APIError` raised anywhere (routes, dependencies, the engine's adapters) becomes
`{"error": {"message", "type", "param", "code"}}` with its status code. `install_error_handlers`
also wraps what the framework answers on its own: 404 (unknown route), 405, 413, request
validation (400 with `param` = the field path) and any unhandled exception (500, logged with the
request id, never with the request's headers or body).

A full disk (`app.store.storage.StorageFullError`, or any error `is_storage_full` recognises, even
one a library wrapped: a multipart spool that could not be written becomes FastAPI's 400) is a 507
with code `storage_full` and `x-should-retry: false` (space must be freed first).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.store.storage import StorageFullError, full_message, is_storage_full
from app.tenancy.quotas import QuotaExceeded, RateLimiterUnavailable

log = logging.getLogger("prefixd.errors")

# type per status, as the OpenAI API uses them
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    507: "insufficient_storage_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers


# convenience constructors used across routers
def not_found(what: str, ident: str | None = None, param: str | None = None) -> APIError:
    msg = f"No such {what}: '{ident}'" if ident is not None else f"No such {what}"
    return APIError(404, msg, param=param, code="not_found")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def envelope(status_code: int, message: str, type: str | None = None, param: str | None = None,
             code: str | None = None) -> dict[str, Any]:
    t = type or _TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": t, "param": param, "code": code}}


def error_response(status_code: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(status_code, message, type, param, code), status_code=status_code, headers=headers)


# what every route may answer, for /docs (`responses=` on every router)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "Bad request"),
        (401, "Missing or invalid API key"),
        (403, "Forbidden"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Request body too large"),
        (429, "Too many requests"),
        (500, "Internal error"),
        (503, "Not ready"),
        (507, "The storage is full (code storage_full)"),
    ]
}


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request", None
    first = errs[0]
    param = _loc_to_param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    if first.get("type") == "missing":
        msg = "Missing required parameter"
    text = f"{msg}: '{param}'" if param else msg
    if len(errs) > 1:
        text += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return text, param


_HTTP_MESSAGES = {
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
}


def _path_table(app) -> list[tuple[re.Pattern, list[str]]]:
    table = getattr(app.state, "_allow_table", None)
    if table is None:
        table = []
        for template, ops in app.openapi().get("paths", {}).items():
            rx = re.escape(template)
            rx = re.sub(r"\\\{[^/]+?:path\\\}", ".+", rx)
            rx = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", rx)
            methods = sorted(m.upper() for m in ops if m.lower() in
                             ("get", "put", "post", "delete", "patch", "head", "options", "trace"))
            table.append((re.compile(f"^{rx}$"), methods))
        app.state._allow_table = table
    return table


def allowed_methods(request: Request) -> list[str]:
    """Every documented method on this path (Starlette's own Allow names only the first route's)."""
    methods: set[str] = set()
    try:
        for rx, ms in _path_table(request.app):
            if rx.match(request.url.path):
                methods.update(ms)
    except Exception:  # noqa: BLE001 - never fail an error response
        return []
    return sorted(methods)


def storage_full_response(request: Request, exc: BaseException | None) -> JSONResponse:
    rid = request.scope.get("request_id", "-")
    log.warning("storage full on %s %s (request %s): %s", request.method, request.url.path, rid,
                _root_cause(exc))
    return error_response(507, full_message(exc), code="storage_full", headers={"x-should-retry": "false"})


def _root_cause(exc: BaseException | None) -> str:
    while exc is not None and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}" if exc is not None else "-"


def _api_error_response(exc: APIError):
    return error_response(exc.status_code, exc.message, exc.type, exc.param, exc.code, exc.headers)


def quota_error(exc: QuotaExceeded) -> APIError:
    """429 naming the quota. A stock quota says `x-should-retry: false`: waiting frees nothing."""
    headers = {"Retry-After": str(exc.retry_after_s)}
    if not exc.rate:
        headers["x-should-retry"] = "false"
    return APIError(429, exc.message, type="rate_limit_error" if exc.rate else "insufficient_quota",
                    code=f"{exc.quota}_quota_exceeded", headers=headers)


def rate_limiter_error(exc: RateLimiterUnavailable) -> APIError:
    return APIError(503, exc.message, code="rate_limiter_unavailable", headers={"Retry-After": str(exc.retry_after_s)})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded):
        return _api_error_response(quota_error(exc))

    @app.exception_handler(RateLimiterUnavailable)
    async def _rate_limiter(request: Request, exc: RateLimiterUnavailable):
        return _api_error_response(rate_limiter_error(exc))

    @app.exception_handler(StorageFullError)
    async def _storage_full(request: Request, exc: StorageFullError):
        return storage_full_response(request, exc)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _api_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 400 and is_storage_full(exc.__cause__):  # the body could not be spooled
            return storage_full_response(request, exc.__cause__)
        detail = exc.detail if isinstance(exc.detail, str) else None
        if status == 404 and detail in (None, "Not Found"):
            message = f"Unknown route: {request.method} {request.url.path}"
        elif status == 405:
            message = f"Method {request.method} not allowed on {request.url.path}"
            allowed = allowed_methods(request)
            if allowed:
                return error_response(405, message, headers={"Allow": ", ".join(allowed)})
        else:
            message = detail or _HTTP_MESSAGES.get(status, "Error")
        return error_response(status, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):  # pragma: no cover - last resort
        if is_storage_full(exc):  # a write no layer translated: still the client's 507
            return storage_full_response(request, exc)
        rid = request.scope.get("request_id", "-")
        log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, rid)
        return error_response(500, f"Internal server error (request id {rid})", "server_error")
