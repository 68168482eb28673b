"""Pure-ASGI middleware: request id, body-size limit, per-route metrics, last-resort 500.

- `x-request-id` on every response: an incoming `X-Request-Id` of 1-128 characters of
  `[A-Za-z0-9._:-]` is echoed, anything else is replaced by a fresh id. Stored in
  `scope["request_id"]` for logs.
- Request bodies are limited while they stream: a `Content-Length` over the limit is refused
  with 413 before the body is read, and a chunked body is counted as it arrives (413 once over).
  A malformed `Content-Length` is a 400 here only under a server that passes it through: uvicorn's
  parser refuses it first with its own plain-text 400 (docs/SERVICE_CONTRACT.md, "HTTP framing").
  Uploads get their setting plus room for multipart framing (routes check the exact size);
  every other route gets `DEFAULT_BODY_LIMIT`.
- Metrics are keyed by the route template (`/v1/files/{file_id}`), never the raw path.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

from starlette.exceptions import HTTPException

from app.api.errors import envelope
from app.observability import metrics

log = logging.getLogger("prefixd.http")
_RID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MULTIPART_SLACK = 64 * 1024
DEFAULT_BODY_LIMIT = 4 * 1024 * 1024


def body_limit_for(settings):
    """Per-route body limits: file uploads and adapter imports are multipart; the rest is JSON."""
    def limit(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/files":
            return settings.max_upload_bytes + MULTIPART_SLACK
        if method == "POST" and path.rstrip("/") == "/v1/models/import":
            return settings.max_zip_bytes + MULTIPART_SLACK
        return DEFAULT_BODY_LIMIT
    return limit


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            try:
                return v.decode("latin-1")
            except Exception:  # pragma: no cover
                return None
    return None


class RequestContextMiddleware:
    def __init__(self, app, body_limit):
        """`body_limit(method, path) -> int`: the largest body accepted on that route."""
        self.app = app
        self.body_limit = body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = _header(scope, b"x-request-id")
        rid = incoming if incoming and _RID_RE.match(incoming) else "req_" + secrets.token_hex(12)
        scope["request_id"] = rid
        start = time.perf_counter()
        state = {"status": 500, "started": False}
        rid_header = (b"x-request-id", rid.encode())

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append(rid_header)
                message = {**message, "headers": headers}
            await send(message)

        async def send_json(status: int, body: dict, extra_headers=()):
            data = json.dumps(body).encode()
            await send_wrapper({
                "type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra_headers],
            })
            await send_wrapper({"type": "http.response.body", "body": data})

        limit = self.body_limit(scope.get("method", ""), scope.get("path", ""))
        try:
            cl = _header(scope, b"content-length")
            if cl is not None:
                try:
                    declared = int(cl)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await send_json(400, envelope(400, "Invalid Content-Length header"))
                    return
                if declared > limit:
                    await send_json(413, envelope(413, f"Request body too large: {declared} bytes (limit {limit})",
                                                  code="request_too_large"), [(b"connection", b"close")])
                    return

            seen = 0

            async def receive_wrapper():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise HTTPException(413, f"Request body too large (limit {limit} bytes)")
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), rid)
            if not state["started"]:
                await send_json(500, envelope(500, f"Internal server error (request id {rid})", "server_error"))
            state["status"] = 500
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("<unmatched>")
            metrics.observe_request(scope.get("method", "-"), template, state["status"], time.perf_counter() - start)
