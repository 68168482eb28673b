"""The FastAPI application: `create_app(settings=None)` (uvicorn `--factory`).

Lifespan: settings -> data dir -> db (Alembic upgrade head) -> blobs -> admin key ->
`app.tenancy.stop_broadcast.start(app)` (distributed mode: the replicas' cancellation channel) ->
`app.serving.lifecycle.start(app)` -> serve -> `app.serving.lifecycle.stop(app)` ->
`app.tenancy.stop_broadcast.shutdown(app)`.
"""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from app.api.deps import load_or_create_admin_key
from app.api.errors import ERROR_RESPONSES, install_error_handlers
from app.api.files import revalidate_pending
from app.api.middleware import RequestContextMiddleware, body_limit_for
from app.api.routes import ROUTERS
from app.config import Settings, get_settings
from app.serving import lifecycle
from app.store.blobs import make_blob_store
from app.store.db import init_db, make_engine, make_session_factory
from app.store.storage import ensure_reserve
from app.tenancy import stop_broadcast

log = logging.getLogger("prefixd")

PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


def _setup_state(app: FastAPI, settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.blobs = make_blob_store(settings)

    ensure_reserve(settings)  # room for deletes once the disk is full (app/store/storage.py)
    key, generated = load_or_create_admin_key(settings)
    app.state.admin_key = key
    if generated:
        print(f"prefixd: generated admin key (saved to {settings.data_dir / 'admin_key'}, mode 0600): {key}",
              file=sys.stderr, flush=True)
    elif key is None:
        log.warning("ADMIN_API_KEY is not set: the admin API is disabled")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    await run_in_threadpool(_setup_state, app, settings)
    revalidate_pending(app)
    await stop_broadcast.start(app)
    await lifecycle.start(app)
    try:
        yield
    finally:
        try:
            await lifecycle.stop(app)
        finally:
            try:
                await stop_broadcast.shutdown(app)
            finally:
                app.state.engine.dispose()


def _custom_openapi(app: FastAPI):
    """Request validation answers 400 in the error envelope, so /docs says so (no 422)."""
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict) and "responses" in op:
                    op["responses"].pop("422", None)
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        app.openapi_schema = schema
        return schema
    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(
        title="prefixd",
        version="0.1.0",
        description="Self-hosted prefix tuning: OpenAI-compatible files, fine-tuning jobs, models and completions.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.serving = None
    app.state.stop_broadcast = None
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, body_limit=body_limit_for(settings))
    for router in ROUTERS:
        app.include_router(router, responses=ERROR_RESPONSES)
    app.openapi = _custom_openapi(app)
    return app
