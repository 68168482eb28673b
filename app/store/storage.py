"""A full disk, as the domain sees it: one error, a free-space floor, and a reserve for deletes.

`StorageFullError` is what every layer raises when a write found no room: an `OSError` with
ENOSPC or EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's `disk_full` (53100), MinIO's
`XMinioStorageFull`, or a library that only kept the OS's words ("No space left on device", as
safetensors does). `is_storage_full(exc)` recognises all of them anywhere in an exception's chain;
`storage_errors()` turns them into `StorageFullError`. The API answers it with 507 `storage_full`
(`app/api/errors.py`); the job runner requeues the job (`app/jobs/storage_full.py`).

Two things keep the service usable while the disk is full (details in docs/STORAGE.md):
- the floor: a local blob write is refused before it starts when it would leave less than
  `STORAGE_MIN_FREE_BYTES` free, so the database (deletes, job state, events) keeps room that
  uploads and checkpoints cannot take;
- the reserve: a file of `STORAGE_RESERVE_BYTES` next to the SQLite database, made at start-up.
  When something else filled the disk anyway (another process, logs), a delete that finds no
  room releases it and tries again; it is made again once the floor is back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("prefixd.storage")

_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
# "No space left on device", "Disk quota exceeded", and SQLite's own words for SQLITE_FULL
_FULL_WORDS = tuple(os.strerror(e) for e in _FULL_ERRNOS) + ("database or disk is full",)
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"
_S3_FULL_CODES = frozenset({"XMinioStorageFull"})
RESERVE_NAME = ".storage-reserve"
# below this the disk counts as full even with the floor turned off: nothing useful fits
_LEAST_FREE = 1024 * 1024


class StorageFullError(Exception):
    """No room to store what was asked. Retry once space was freed."""

    def __init__(self, message: str = "The storage is full"):
        super().__init__(message)
        self.message = message


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield orig
            seen.add(id(orig))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _is_full(e: BaseException) -> bool:
    if isinstance(e, StorageFullError):
        return True
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
        return True
    if getattr(e, "sqlstate", None) == _PG_DISK_FULL:
        return True
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and (resp.get("Error") or {}).get("Code") in _S3_FULL_CODES:
        return True
    text = str(e)
    return any(w in text for w in _FULL_WORDS)


def is_storage_full(exc: BaseException | None) -> bool:
    return any(_is_full(e) for e in _chain(exc))


def full_message(exc: BaseException | None = None) -> str:
    if isinstance(exc, StorageFullError):
        return exc.message
    return ("The storage is full: nothing more can be stored until space is freed "
            "(delete files or models you no longer need)")


@contextlib.contextmanager
def storage_errors():
    """Re-raise what `is_storage_full` recognises as `StorageFullError` (the cause kept)."""
    try:
        yield
    except StorageFullError:
        raise
    except Exception as e:
        if is_storage_full(e):
            raise StorageFullError(full_message()) from e
        raise


# ----------------------------------------------------------------------------- free space


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or the
    nearest existing directory above it)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def check_room(path: str | os.PathLike, nbytes: int, min_free: int) -> None:
    """StorageFullError unless writing `nbytes` under `path` leaves `min_free` bytes free."""
    if min_free <= 0:
        return
    free = free_bytes(path)
    if free - max(0, nbytes) < min_free:
        raise StorageFullError(
            f"The storage is full: {max(0, nbytes)} bytes do not fit while keeping the "
            f"{_mib(min_free)} that deletes and job records need ({_mib(free)} free). "
            "Delete files or models you no longer need, or ask the operator for more space")


def local_dirs(settings) -> dict[str, Path]:
    """The local directories the service writes, by what they hold."""
    dirs: dict[str, Path] = {"data": Path(settings.data_dir)}
    if not settings.s3_bucket:
        dirs["blobs"] = Path(settings.blob_dir)
    db = sqlite_dir(settings)
    if db is not None:
        dirs["database"] = db
    return dirs


def sqlite_dir(settings) -> Path | None:
    from sqlalchemy.engine import make_url

    try:
        u = make_url(settings.resolved_database_url)
    except Exception:  # noqa: BLE001
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).resolve().parent


def storage_status(settings) -> str | None:
    """None while every local directory has room above the floor; else why not (no paths: this
    is shown on the unauthenticated /readyz)."""
    floor = max(int(settings.storage_min_free_bytes), _LEAST_FREE)
    seen: set[int] = set()
    for what, d in local_dirs(settings).items():
        try:
            dev = os.stat(d if d.exists() else d.parent).st_dev
            if dev in seen:
                continue
            seen.add(dev)
            free = free_bytes(d)
        except OSError:
            continue  # a missing directory is the storage check's to report
        if free < floor:
            return f"full: {_mib(free)} free for {what} (floor {_mib(floor)})"
    return None


# ----------------------------------------------------------------------------- the reserve


def reserve_path(settings) -> Path | None:
    """Where the reserve lives: beside the SQLite database, the one writer a delete needs room
    for (a blob delete only frees space). None without a local database or with no reserve."""
    d = sqlite_dir(settings)
    if d is None or int(settings.storage_reserve_bytes) <= 0:
        return None
    return d / RESERVE_NAME


def ensure_reserve(settings) -> bool:
    """Make the reserve if it is missing and the floor stays free after it. True if it exists."""
    path = reserve_path(settings)
    if path is None:
        return False
    size = int(settings.storage_reserve_bytes)
    try:
        if path.is_file() and path.stat().st_size >= size:
            return True
        if free_bytes(path.parent) - size < max(int(settings.storage_min_free_bytes), _LEAST_FREE):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{RESERVE_NAME}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # blocks really allocated, not a sparse file
            except OSError as e:
                if e.errno in _FULL_ERRNOS:
                    raise
                chunk = os.urandom(1024 * 1024)  # incompressible: a compressing filesystem keeps it all
                for off in range(0, size, len(chunk)):
                    os.write(fd, chunk[:min(len(chunk), size - off)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path.with_name(f"{RESERVE_NAME}.tmp-{os.getpid()}"))
        log.warning("could not make the storage reserve", exc_info=True)
        return False


def release_reserve(settings) -> bool:
    """Delete the reserve, giving its space to the next database write. True if it was there."""
    path = reserve_path(settings)
    if path is None:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    log.warning("storage full: released the %s reserve so that a delete can be recorded",
                _mib(int(settings.storage_reserve_bytes)))
    return True


def with_reserve(settings, fn):
    """`fn()`; if it finds the storage full, release the reserve and run it once more."""
    try:
        with storage_errors():
            return fn()
    except StorageFullError:
        if not release_reserve(settings):
            raise
    with storage_errors():
        return fn()
