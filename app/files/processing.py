"""Processing of a stored upload: validate it and record the outcome (`uploaded` -> `processed` |
`error`). Called after the upload's response (the API), and by the job monitor for files whose
replica died before it finished (app/jobs/recovery.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.files.validation import detect_format, validate_dataset
from app.store.tables import File

log = logging.getLogger("prefixd.files")

UPLOAD_PURPOSES = ("fine-tune", "base-train", "evals")  # evals: {"item": ...} rows of eval runs

_validating: set[str] = set()
_validating_lock = threading.Lock()


def validate_stored_file(settings, session_factory, blobs, file_id: str,
                         count_tokens: Callable[[str], int] | None = None) -> None:
    """Validate one stored file and record the outcome. Idempotent; never raises. Token counts use
    `count_tokens` (the served tokenizer) when given, else an estimate."""
    with _validating_lock:
        if file_id in _validating:
            return
        _validating.add(file_id)
    try:
        with session_factory() as session:
            f = session.get(File, file_id)
            if f is None or f.status != "uploaded" or f.purpose not in UPLOAD_PURPOSES:
                return
            key, purpose, filename = f.blob_key, f.purpose, f.filename
        try:
            with blobs.open(key) as fh:
                res = validate_dataset(
                    fh,
                    purpose,
                    detect_format(filename, purpose),
                    max_line_bytes=settings.max_jsonl_line_bytes,
                    count_tokens=count_tokens,
                )
            status, details = ("processed" if res.ok else "error"), res.details
            rows, tokens = res.rows, res.tokens
        except Exception:  # noqa: BLE001
            log.exception("validation of %s failed", file_id)
            status, details, rows, tokens = "error", "internal error while validating the file", None, None
        with session_factory() as session:
            f = session.get(File, file_id)
            if f is None:  # deleted meanwhile
                return
            f.status, f.status_details, f.row_count, f.token_count = status, details, rows, tokens
            session.commit()
    except Exception:  # noqa: BLE001
        log.exception("could not record validation of %s", file_id)
    finally:
        with _validating_lock:
            _validating.discard(file_id)
