"""A full disk for real: the API process runs with DATA_DIR (and TMPDIR) on a tmpfs of a few MB that
the test mounts in a mount namespace of its own (`unshare --mount`, as root; skipped with the
reason where mounting is refused). The test fills it through /proc/<holder>/root and checks that
uploads get 507 storage_full, /readyz says so, deletes still work, and all is well once space is
freed. The same faults injected in-process: tests/jobs/test_storage_full.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import ServiceProcess, base_env

DISK_BYTES = 8 * 1024 * 1024
FLOOR = 1024 * 1024
RESERVE = 512 * 1024


@dataclass
class SmallDisk:
    path: Path  # where it is mounted, as the processes inside the namespace see it
    view: Path  # the same directory, as this test process sees it
    enter: list[str]  # command prefix that runs a program inside the namespace

    def fill(self) -> int:
        """Write a filler file until the filesystem is full; returns its size."""
        n = 0
        chunk = os.urandom(64 * 1024)
        with open(self.view / "filler", "wb", buffering=0) as fh:
            while True:
                try:
                    n += fh.write(chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
        # the last partial chunk may leave a few bytes: fill those too
        with open(self.view / "filler", "ab", buffering=0) as fh:
            for size in (4096, 512, 1):
                while True:
                    try:
                        n += fh.write(b"\0" * size)
                    except OSError:
                        break
        return n

    def free(self) -> int:
        return shutil.disk_usage(self.view).free


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size={DISK_BYTES},mode=0755 tmpfs "$0" && echo mounted && exec sleep 3600', str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline().strip()
    if line != "mounted":
        holder.wait(10)
        pytest.skip(
            f"cannot mount a tmpfs in a new mount namespace: {holder.stderr.read().strip() or holder.returncode}"
        )
    view = Path(f"/proc/{holder.pid}/root") / mnt.relative_to("/")
    assert shutil.disk_usage(view).total <= DISK_BYTES  # the tmpfs, not the directory under it
    try:
        yield SmallDisk(mnt, view, ["nsenter", f"--target={holder.pid}", "--mount", "--"])
    finally:
        holder.kill()
        holder.wait(10)


def _jsonl(n_rows: int, width: int = 100) -> bytes:
    return "".join(
        json.dumps({"prompt": f"row {i} " + "x" * width, "completion": " y"}) + "\n" for i in range(n_rows)
    ).encode()


def test_a_full_disk_answers_507_keeps_deletes_working_and_recovers(small_disk, tiny_base_dirs, tmp_path):
    data_dir, spool = small_disk.path / "data", small_disk.path / "tmp"
    (small_disk.view / "data").mkdir()
    (small_disk.view / "tmp").mkdir()
    env = base_env(data_dir, tiny_base_dirs["gpt2"])
    env.update(
        {
            "TMPDIR": str(spool),
            "SERVING_ENABLED": "0",
            "STORAGE_MIN_FREE_BYTES": str(FLOOR),
            "STORAGE_RESERVE_BYTES": str(RESERVE),
            "JOB_MONITOR_INTERVAL_S": "60",
        }
    )
    svc = ServiceProcess(env, tmp_path / "svc")
    svc.cmd_prefix = small_disk.enter
    try:
        svc.start()
        reserve = small_disk.view / "data" / ".storage-reserve"
        assert reserve.is_file() and reserve.stat().st_size == RESERVE
        tenant = svc.make_tenant()
        c = tenant.client

        def upload(data: bytes):
            return c.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})

        big = upload(_jsonl(2000))  # ~230 KB
        small = upload(_jsonl(1))
        assert big.status_code == 200 and small.status_code == 200, (big.text, small.text)
        assert c.get("/readyz").json()["checks"]["storage"] == "ok"

        small_disk.fill()
        assert small_disk.free() < 64 * 1024
        # /readyz says so
        checks = c.get("/readyz").json()["checks"]
        assert checks["storage"].startswith("full: "), checks
        # an upload is a 507 in the envelope, not a 500
        r = upload(_jsonl(5))
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "storage_full" and r.headers["x-should-retry"] == "false"
        # the small file's delete frees almost nothing: the database needs the reserve to record it
        r = c.delete(f"/v1/files/{small.json()['id']}")
        assert r.status_code == 200, f"{r.status_code} {r.text}\n{svc.log()}"
        assert not reserve.exists()
        assert c.get(f"/v1/files/{small.json()['id']}").status_code == 404
        r = c.delete(f"/v1/files/{big.json()['id']}")
        assert r.status_code == 200, r.text
        assert c.get("/v1/files").json()["data"] == []

        # space is freed: uploads work again, and the reserve is made again at the next delete
        (small_disk.view / "filler").unlink()
        assert c.get("/readyz").json()["checks"]["storage"] == "ok"
        again = upload(_jsonl(5))
        assert again.status_code == 200, again.text
        assert c.delete(f"/v1/files/{again.json()['id']}").status_code == 200
        assert reserve.is_file() and reserve.stat().st_size == RESERVE
    finally:
        svc.stop()
