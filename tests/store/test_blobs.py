"""Both blob stores behind one interface: a local directory and S3 (a real moto server over HTTP)."""

from __future__ import annotations

import io
import os

import pytest

from app.store.blobs import BlobNotFound, LocalBlobStore, S3BlobStore, check_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("moto_endpoint")
    return S3BlobStore(f"test-{os.urandom(4).hex()}", prefix="pfx", endpoint_url=endpoint,
                       access_key="testing", secret_key="testing")


def test_roundtrip(store, tmp_path):
    store.put_bytes("files/t1/a", b"hello")
    assert store.get_bytes("files/t1/a") == b"hello"
    assert store.exists("files/t1/a") and not store.exists("files/t1/b")
    assert store.size("files/t1/a") == 5
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    store.put_file("adapters/t1/m/adapter.safetensors", src)
    n = store.put_stream("files/t1/s", io.BytesIO(b"x" * 2_500_000))
    assert n == 2_500_000
    dest = tmp_path / "out" / "a.bin"
    store.download_to("adapters/t1/m/adapter.safetensors", dest)
    assert dest.read_bytes() == src.read_bytes()
    with store.open("files/t1/s") as fh:
        assert len(fh.read()) == 2_500_000
    assert b"".join(store.iter_chunks("files/t1/a", 2)) == b"hello"
    store.put_bytes("files/t1/a", b"replaced")
    assert store.get_bytes("files/t1/a") == b"replaced"
    store.ping()


def test_list_and_delete_prefix(store):
    for k in ("files/t1/a", "files/t1/b", "files/t10/c", "adapters/t1/x/y"):
        store.put_bytes(k, b"1")
    assert store.list("files/t1/") == ["files/t1/a", "files/t1/b"]
    assert store.list("files/t1") == ["files/t1/a", "files/t1/b", "files/t10/c"]
    assert len(store.list()) == 4
    assert store.delete_prefix("files/t1/") == 2
    assert store.list("files/") == ["files/t10/c"]
    store.delete("files/t10/c")
    store.delete("files/t10/c")  # idempotent
    assert not store.exists("files/t10/c")


def test_missing(store, tmp_path):
    with pytest.raises(BlobNotFound):
        store.get_bytes("nope/x")
    with pytest.raises(BlobNotFound):
        store.download_to("nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a", "a/./b", "a b", "a\\b", "é", "a/\x00"])
def test_bad_keys_rejected(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        check_key(key)


def test_local_writes_are_atomic(tmp_path):
    store = LocalBlobStore(tmp_path / "b")

    class Boom(io.RawIOBase):
        def __init__(self):
            self.n = 0

        def read(self, size=-1):
            self.n += 1
            if self.n > 2:
                raise RuntimeError("crash mid-write")
            return b"x" * 1000

    store.put_bytes("k/v", b"old")
    with pytest.raises(RuntimeError):
        store.put_stream("k/v", Boom())
    assert store.get_bytes("k/v") == b"old"  # never half a file
    assert not any(p.is_file() for p in (tmp_path / "b" / ".tmp").iterdir())
    assert store.list() == ["k/v"]  # temp files are not listed


def test_s3_bucket_created_once(moto_endpoint):
    name = f"shared-{os.urandom(4).hex()}"
    a = S3BlobStore(name, endpoint_url=moto_endpoint, access_key="testing", secret_key="testing")
    a.put_bytes("k", b"1")
    b = S3BlobStore(name, endpoint_url=moto_endpoint, access_key="testing", secret_key="testing")
    assert b.get_bytes("k") == b"1"
