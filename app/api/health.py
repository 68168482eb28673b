"""Operations: `/healthz` (the process is up), `/readyz` (database, broker, storage and the
served model answer; 503 with the failing checks otherwise) and `/metrics` (Prometheus text).
No key needed.

A full disk (free space below `STORAGE_MIN_FREE_BYTES` where the service writes) shows as
`storage: "full: ..."` with status `degraded`, and still 200: the replica serves completions,
reads and the deletes that free the space, which a load balancer would stop sending it on a 503.

`/readyz` asks the serving engine through `app.state.serving`: it is ready when the engine's
`ready` attribute (or `is_ready()`) is true; the engine may explain itself with `status_message`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from app.api.schemas import Health, Readiness
from app.observability import metrics
from app.store.db import ping as db_ping
from app.store.storage import storage_status
from app.store.tables import Job

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def _broker_ping(settings) -> None:
    if settings.redis_url:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return
    url = settings.broker_url
    if url.startswith("sqla+sqlite:///"):
        path = Path(url[len("sqla+sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=2)
        try:
            conn.execute("SELECT 1")
        finally:
            conn.close()


def serving_ready(app) -> tuple[bool, str]:
    serving = getattr(app.state, "serving", None)
    if serving is None:
        return False, "serving engine not started"
    ready = getattr(serving, "ready", None)
    if ready is None and callable(getattr(serving, "is_ready", None)):
        ready = serving.is_ready()
    elif callable(ready):
        ready = ready()
    if ready:
        return True, "ok"
    msg = getattr(serving, "status_message", None)
    return False, str(msg() if callable(msg) else msg or "model not loaded")


def _checks(app) -> dict[str, str]:
    out: dict[str, str] = {}
    settings = app.state.settings
    for name, fn in (
        ("database", lambda: db_ping(app.state.engine)),
        ("broker", lambda: _broker_ping(settings)),
        ("storage", lambda: app.state.blobs.ping()),
    ):
        try:
            fn()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, not raised
            out[name] = f"error: {type(e).__name__}"
    if out["storage"] == "ok":
        try:
            out["storage"] = storage_status(settings) or "ok"
        except Exception as e:  # noqa: BLE001 - reported, not raised
            out["storage"] = f"error: {type(e).__name__}"
    ok, msg = serving_ready(app)
    out["model"] = "ok" if ok else msg
    return out


def _storage_full(name: str, value: str) -> bool:
    return name == "storage" and value.startswith("full")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(request: Request):
    checks = await run_in_threadpool(_checks, request.app)
    ready = all(v == "ok" or _storage_full(k, v) for k, v in checks.items())
    status = "not_ready" if not ready else "degraded" if checks["storage"] != "ok" else "ready"
    body = Readiness(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _refresh_job_gauges(app) -> None:
    try:
        with app.state.session_factory() as session:
            rows = session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all()
        metrics.set_jobs_by_status({s: int(n) for s, n in rows})
    except Exception:  # noqa: BLE001 - metrics never fail the scrape
        pass


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics(request: Request) -> Response:
    await run_in_threadpool(_refresh_job_gauges, request.app)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
