"""Blob storage behind one interface: a local directory, or S3-compatible storage via boto3.

Keys are built by the service from issued ids only (`files/{tenant_id}/{file_id}`,
`adapters/{tenant_id}/{model}/...`, `bases/{slug}/...`); every key is still checked against
`[A-Za-z0-9._/-]`, with no empty, `.` or `..` segment and no leading `/`, so that a bug can never
escape the store. Writes are atomic: locally a temp file in the same directory then `os.replace`;
on S3 a PUT (or a multipart upload) becomes visible only when complete.

Convention for tenant data: keys under `{kind}/{tenant_id}/...`, so deleting a tenant can remove
`files/{tid}/`, `adapters/{tid}/`, `jobs/{tid}/` and `checkpoints/{tid}/` by prefix.

`iter_with_mtime` and `sweep_temp` serve the orphan sweep (`app.jobs.recovery`): blobs and
half-written uploads that a crashed process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.store.storage import check_room, storage_errors

_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]+$")
CHUNK = 1024 * 1024


class BlobNotFound(KeyError):
    pass


def check_key(key: str, prefix: bool = False) -> str:
    if not isinstance(key, str) or not key or len(key) > 1024 or not _KEY_RE.match(key):
        raise ValueError(f"invalid blob key {key!r}")
    if key.startswith("/"):
        raise ValueError(f"invalid blob key {key!r}")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore:
    """Interface. `open` returns a readable binary file-like object (close it)."""

    def put_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def put_file(self, key: str, path: str | os.PathLike) -> None: raise NotImplementedError
    def put_stream(self, key: str, fileobj: BinaryIO) -> int: raise NotImplementedError
    def get_bytes(self, key: str) -> bytes: raise NotImplementedError
    def open(self, key: str) -> BinaryIO: raise NotImplementedError
    def download_to(self, key: str, path: str | os.PathLike) -> None: raise NotImplementedError
    def delete(self, key: str) -> None: raise NotImplementedError
    def delete_prefix(self, prefix: str) -> int: raise NotImplementedError
    def exists(self, key: str) -> bool: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    # (key, modification time in Unix seconds) under `prefix`, in no particular order
    def iter_with_mtime(self, prefix: str = "") -> Iterator[tuple[str, float]]: raise NotImplementedError
    # remove writes that never completed (a process died mid-upload) last touched before
    # `older_than` (Unix seconds); returns how many
    def sweep_temp(self, older_than: float) -> int: raise NotImplementedError
    def size(self, key: str) -> int: raise NotImplementedError
    def ping(self) -> None: raise NotImplementedError

    def iter_chunks(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        with self.open(key) as fh:
            while True:
                b = fh.read(chunk_size)
                if not b:
                    return
                yield b


@storage_errors()  # a local disk full: StorageFullError
def _atomic_download(fetch, path: str | os.PathLike) -> None:
    """Write through a temp file next to `path`, then rename: never half a file at `path`."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            fetch(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self): return self
    def __exit__(self, *exc): return exc[0] is not None and issubclass(exc[0], OSError)


class LocalBlobStore(BlobStore):
    """`min_free_bytes`: a write that would leave less free on the disk is refused before it
    starts (StorageFullError), so that the database beside the blobs keeps room (app.store.storage)."""

    def __init__(self, root: str | os.PathLike, min_free_bytes: int = 0):
        self.min_free_bytes = int(min_free_bytes)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def _path(self, key: str, prefix: bool = False) -> Path:
        check_key(key, prefix=prefix)
        p = (self.root / key.rstrip("/")).resolve() if key.rstrip("/") else self.root
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"invalid blob key {key!r}")
        return p

    def _write(self, key: str, writer, size: int | None = None) -> int:
        dest = self._path(key)
        with storage_errors():  # ENOSPC / EDQUOT: StorageFullError
            check_room(self._tmp, size or 0, self.min_free_bytes)
            return self._write_tmp(dest, writer)

    def _write_tmp(self, dest: Path, writer) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                n = writer(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
            return n
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise

    def put_bytes(self, key, data):
        self._write(key, lambda out: out.write(data), len(data))

    def put_file(self, key, path):
        def w(out):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
            return os.path.getsize(path)
        self._write(key, w, os.path.getsize(path))

    def put_stream(self, key, fileobj):
        def w(out):
            n = 0
            while True:
                b = fileobj.read(CHUNK)
                if not b:
                    return n
                out.write(b)
                n += len(b)
        return self._write(key, w, _remaining(fileobj))

    def open(self, key):
        p = self._path(key)
        try:
            return open(p, "rb")
        except (FileNotFoundError, IsADirectoryError) as e:
            raise BlobNotFound(key) from e

    def get_bytes(self, key):
        with self.open(key) as fh:
            return fh.read()

    def download_to(self, key, path):
        with self.open(key) as src:
            _atomic_download(lambda out: shutil.copyfileobj(src, out, CHUNK), path)

    def delete(self, key):
        with _suppress():
            self._path(key).unlink()

    def delete_prefix(self, prefix):
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        # prune directories the prefix named, if now empty
        if prefix.endswith("/"):
            d = self._path(prefix, prefix=True)
            if d != self.root and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        return len(keys)

    def exists(self, key):
        return self._path(key).is_file()

    def size(self, key):
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise BlobNotFound(key) from e

    def _walk(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, path) of every blob under `prefix`."""
        if prefix:
            check_key(prefix, prefix=True)
        # walk the deepest directory the prefix names, then filter by the full prefix
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(base, prefix=True) if base else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != ".tmp"]
            for f in filenames:
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    yield rel, path

    def list(self, prefix=""):
        return sorted(k for k, _ in self._walk(prefix))

    def iter_with_mtime(self, prefix=""):
        for key, path in self._walk(prefix):
            try:
                yield key, os.stat(path).st_mtime
            except FileNotFoundError:  # deleted since the walk saw it
                continue

    def sweep_temp(self, older_than):
        n = 0
        for p in self._tmp.glob(".put-*"):
            with _suppress():
                if p.stat().st_mtime < older_than:
                    p.unlink()
                    n += 1
        return n

    def ping(self):
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"blob root {self.root} is not a writable directory")


def _remaining(fileobj) -> int | None:
    """Bytes left to read in a seekable file (an upload's spool), else None (unknown)."""
    try:
        pos = fileobj.tell()
        end = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(pos)
        return max(0, end - pos)
    except (AttributeError, OSError, ValueError):
        return None


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key: str | None = None, secret_key: str | None = None,
                 create_bucket: bool = True):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        if create_bucket:
            self._ensure_bucket(region)

    def _ensure_bucket(self, region: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            kw = {}
            if region and region != "us-east-1":
                kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **kw)
            except ClientError as e:  # created by a concurrent process
                if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _k(self, key: str, prefix: bool = False) -> str:
        return self.prefix + check_key(key, prefix=prefix)

    @staticmethod
    def _missing(e) -> bool:
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def put_file(self, key, path):
        self.client.upload_file(str(path), self.bucket, self._k(key))

    def put_stream(self, key, fileobj):
        counter = _CountingReader(fileobj)
        self.client.upload_fileobj(counter, self.bucket, self._k(key))
        return counter.n

    def open(self, key):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        except ClientError as e:
            if self._missing(e):
                raise BlobNotFound(key) from e
            raise

    def get_bytes(self, key):
        body = self.open(key)
        try:
            return body.read()
        finally:
            body.close()

    def download_to(self, key, path):
        from botocore.exceptions import ClientError

        try:
            _atomic_download(lambda out: self.client.download_fileobj(self.bucket, self._k(key), out), path)
        except ClientError as e:
            if self._missing(e):
                raise BlobNotFound(key) from e
            raise

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix):
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._k(k)} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def exists(self, key):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if self._missing(e):
                return False
            raise

    def size(self, key):
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
        except ClientError as e:
            if self._missing(e):
                raise BlobNotFound(key) from e
            raise

    def list(self, prefix=""):
        return sorted(k for k, _ in self.iter_with_mtime(prefix))

    def iter_with_mtime(self, prefix=""):
        full = self.prefix + (check_key(prefix, prefix=True) if prefix else "")
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):], obj["LastModified"].timestamp()

    def sweep_temp(self, older_than):
        # the S3 form of a half-written upload: a multipart upload never completed nor aborted,
        # whose parts are stored (and billed) until someone aborts it
        n = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self.prefix):
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() < older_than:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
        return n

    def ping(self):
        self.client.head_bucket(Bucket=self.bucket)


class _CountingReader:
    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        b = self.f.read(size)
        self.n += len(b)
        return b


def make_blob_store(settings) -> BlobStore:
    if settings.s3_bucket:
        return S3BlobStore(
            settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region, access_key=settings.aws_access_key_id,
            secret_key=settings.aws_secret_access_key,
        )
    return LocalBlobStore(settings.blob_dir, min_free_bytes=settings.storage_min_free_bytes)
