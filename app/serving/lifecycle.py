"""Start and stop the serving engine with the API process (called from app.main's lifespan).

`start(app)` sets `app.state.serving` (a `ServingEngine`), starts its scheduler thread, and loads
the startup base in a background thread: `BASE_MODEL` if set, otherwise `DATA_DIR/models/default`,
built on first start (see `app.store.base_registry`). `/readyz` answers 503 until `engine.ready`.
With `SERVING_ENABLED=0` the process serves no model: `app.state.serving` stays None and the
inference routes answer 503.
"""

from __future__ import annotations

import asyncio
import logging

from app.ml.adapter import META_FILE, TABLE_FILE, adapter_from_bytes, deserialize_adapter
from app.serving.engine import ServingEngine, load_served_base
from app.store.base_registry import _complete_local, _gguf_source, ensure_default_base, served_base_dir

log = logging.getLogger("prefixd.serving")


def load_adapter_blob(blobs, blob_key: str):
    """An adapter from storage: one zip blob (`adapter_to_bytes`), or a prefix holding the two files."""

    if blob_key.endswith("/"):
        return deserialize_adapter({name: blobs.get_bytes(blob_key + name) for name in (META_FILE, TABLE_FILE)})
    return adapter_from_bytes(blobs.get_bytes(blob_key))


def make_engine(settings, blobs) -> ServingEngine:
    return ServingEngine(settings, adapter_loader=lambda key: load_adapter_blob(blobs, key))


def startup_loader(settings, session_factory, blobs):
    """A `load()` for `ServingEngine.start`: (base id, Base) of the startup base."""

    def load():
        _slug, path = served_base_dir(settings)
        # first start: build (or fetch) the default base; a GGUF BASE_MODEL is checked against its
        # conversion every start, so a replaced file is converted again before anything loads
        if not _complete_local(path) or _gguf_source(settings) is not None:
            with session_factory() as session:
                ensure_default_base(settings, session, blobs)
        base = load_served_base(settings, path)
        with session_factory() as session:
            record = ensure_default_base(settings, session, blobs, fingerprint=base.fingerprint)
            base_id = record.id
        return base_id, base

    return load


async def start(app) -> None:
    settings = app.state.settings
    if not settings.serving_enabled:
        app.state.serving = None
        return
    engine = make_engine(settings, app.state.blobs)
    app.state.serving = engine
    engine.start(startup_loader(settings, app.state.session_factory, app.state.blobs))


async def stop(app) -> None:
    engine = getattr(app.state, "serving", None)
    if engine is not None:
        await asyncio.to_thread(engine.stop)
