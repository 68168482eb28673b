"""The `prefixd` CLI as a user runs it: `python -m app.cli ...` as a subprocess against a real API
and Celery worker (one service for the module), through pipes, and through a pseudo-terminal for the
live progress bar and Ctrl-C.

Jobs are tiny (P = 4, the tiny GPT-2, a few hundred steps at most), so each trains in seconds;
what is checked is what the CLI prints and returns, against what the API says.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import ROOT, launch

pytestmark = pytest.mark.integration

WORDS = {"red": " warm", "orange": " warm", "yellow": " warm", "blue": " cold", "green": " cold", "purple": " cold"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SMALL = ["--num-virtual-tokens", "4", "--interval", "0.2"]


def dataset(n: int = 60) -> str:
    keys = list(WORDS)
    return "".join(json.dumps({"prompt": f"item {i} is {keys[i % 6]} ->", "completion": WORDS[keys[i % 6]]}) + "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_base_dirs):
    """One API for the module; its worker boots in the background meanwhile (the tests that need no
    worker come first in this file, and a job created earlier waits in `queued`)."""
    s = launch(tmp_path_factory.mktemp("cli"), "embedded", tiny_base_dirs["gpt2"], None,
               {"JOB_MONITOR_INTERVAL_S": "0.5"})
    failed: list[BaseException] = []

    def boot():
        try:
            s.start_worker()
        except Exception as e:  # noqa: BLE001 - reported by the tests that need the worker
            failed.append(e)

    booting = threading.Thread(target=boot, daemon=True)
    booting.start()
    s.worker_failed = failed
    s.wait_ready()
    yield s
    booting.join(120)
    s.stop()


@pytest.fixture(scope="module")
def tenant(svc):
    return svc.make_tenant("cli")


@pytest.fixture(scope="module")
def env(svc, tenant) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFIXD_"))}
    e.update({"PREFIXD_BASE_URL": svc.base_url + "/v1", "PREFIXD_API_KEY": tenant.key,
              "PREFIXD_ADMIN_KEY": svc.admin_key, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    return e


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli-data") / "train.jsonl"
    p.write_text(dataset())
    return p


def cli(env: dict, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def one_json(p: subprocess.CompletedProcess) -> dict:
    ok(p)
    return json.loads(p.stdout)  # raises on anything but exactly one document


class Pty:
    """The CLI in a pseudo-terminal of 160 columns, as a user's shell runs it."""

    def __init__(self, env: dict, *args: str):
        self.buf = b""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, stdin, stdout and stderr
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "app.cli", *args], {**env, "TERM": "xterm-256color"})
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.buf += data
        return bool(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.buf.decode(errors="replace"))

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if not self._read(0.2):
                break
        raise AssertionError(f"{pattern!r} not seen; the terminal showed:\n{self.text[-3000:]}")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05):
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.2)
        os.kill(self.pid, 9)
        raise AssertionError(f"the CLI did not exit; the terminal showed:\n{self.text[-3000:]}")

    def lines(self) -> list[str]:
        return [ln.strip() for ln in re.split(r"[\r\n]", self.text) if ln.strip()]


# ----------------------------------------------------------------------------- no worker needed

def test_upload_of_a_bad_file_names_each_bad_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good, no_completion = json.dumps({"prompt": "a", "completion": " b"}), json.dumps({"prompt": "a"})
    bad.write_text(f"{good}\n{{not json\n{no_completion}\n")
    p = cli(env, "files", "upload", str(bad), "--json")
    assert p.returncode == 1
    assert json.loads(p.stdout)["status"] == "error"  # the one document, then the verdict on stderr
    assert "line 2: not JSON" in p.stderr and 'line 3: missing field "completion"' in p.stderr
    assert "uploaded bad.jsonl as file-" in p.stderr


def test_json_is_exactly_one_document(env):
    commands = [("files", "list"), ("models", "show", "gpt2"), ("admin", "bases", "served")]
    with ThreadPoolExecutor(len(commands)) as pool:
        docs = list(pool.map(lambda args: one_json(cli(env, *args, "--json")), commands))
    assert [d["object"] for d in docs] == ["list", "model", "serving"]
    assert docs[1]["kind"] == "base" and docs[1]["served"] is True and docs[2]["model"] == "gpt2"


def test_api_errors_are_words_on_stderr_and_a_non_zero_exit(env):
    as_tenant = {**env, "PREFIXD_ADMIN_KEY": env["PREFIXD_API_KEY"]}
    with ThreadPoolExecutor(2) as pool:
        missing = pool.submit(cli, env, "jobs", "show", "ftjob-0000")
        refused = pool.submit(cli, as_tenant, "admin", "tenants", "list", "--json")
    p = missing.result()
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: No such fine-tuning job: 'ftjob-0000'\n")
    p = refused.result()
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: Admin routes need the admin key\n")


def test_eval_on_a_server_without_the_evals_api(env, tenant, tmp_path):
    if tenant.client.post("/v1/evals", json={}).status_code != 404:
        pytest.skip("this server has an Evals API; the Evals tests cover it")
    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps({"name": "colours", "data_source_config": {
        "type": "custom", "item_schema": {"type": "object", "properties": {"prompt": {"type": "string"}}},
        "include_sample_schema": True}, "testing_criteria": [
        {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.completion}}", "operation": "eq"}]}))
    p = cli(env, "eval", "create", str(cfg))
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error: this server has no Evals API (404: Unknown route: POST /v1/evals)")


def test_admin_tenants_and_keys(env, svc):
    t = one_json(cli(env, "admin", "tenants", "create", "acme-cli", "--json"))
    assert t["id"].startswith("tenant-") and t["api_key"].startswith("sk-")
    with ThreadPoolExecutor(2) as pool:
        listing = pool.submit(cli, env, "admin", "tenants", "list")
        created = pool.submit(cli, env, "admin", "keys", "create", t["id"], "--json")
    rows = [line.split("\t") for line in ok(listing.result()).stdout.splitlines()]
    assert rows[0] == ["id", "name", "suspended", "created"]
    assert [t["id"], "acme-cli", "False"] in [r[:3] for r in rows]
    key = one_json(created.result())
    assert svc.client(key["api_key"]).get("/v1/files").status_code == 200
    p = ok(cli(env, "admin", "keys", "revoke", t["id"], key["id"]))
    assert p.stdout == f"{key['id']} revoked\n"
    assert svc.client(key["api_key"]).get("/v1/files").status_code == 401
    assert svc.client(t["api_key"]).get("/v1/files").status_code == 200  # the tenant's first key still works


# ----------------------------------------------------------------------------- jobs --watch

@pytest.fixture(scope="module")
def watched(svc, env, train_file) -> dict[str, subprocess.CompletedProcess]:
    """Two `jobs create --watch` at once, stdout a pipe: one from a local path (uploaded first), one
    from a file id with --json. The worker trains them one after the other."""
    f = one_json(cli(env, "files", "upload", str(train_file), "--json"))
    assert f["status"] == "processed" and f["row_count"] == 60
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(cli, env, "jobs", "create", "--file", str(train_file), "--n-epochs", "2",
                            "--batch-size", "4", "--suffix", "piped", "--watch", *SMALL)
        as_json = pool.submit(cli, env, "jobs", "create", "--file", f["id"], "--n-epochs", "1", "--batch-size", "8",
                              "--watch", "--json", *SMALL)
        out = {"plain": plain.result(), "json": as_json.result(), "file": f}
    assert not svc.worker_failed, svc.worker_failed
    return out


@pytest.fixture(scope="module")
def adapter(watched) -> str:
    return ok(watched["plain"]).stdout.splitlines()[-1]


def test_watch_without_a_terminal_prints_lines_and_ends_with_the_adapter(watched, tenant):
    p = ok(watched["plain"])
    lines = p.stdout.splitlines()
    assert not ANSI.search(p.stdout)  # plain lines: no colours, no cursor movement
    assert re.fullmatch(rf"ft:gpt2:{tenant.id}:piped:ftjob-[0-9a-f]+", lines[-1])
    job_id = lines[-1].rsplit(":", 1)[1]
    job = tenant.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == lines[-1]
    hp = job["method"]["prefix"]["hyperparameters"]
    assert hp["n_epochs"] == 2 and hp["batch_size"] == 4
    assert any(ln.startswith("uploaded train.jsonl as file-") for ln in lines)
    assert any(re.match(rf"{job_id} running step \d+/\d+ ", ln) for ln in lines), lines
    assert re.match(rf"{job_id} succeeded step (\d+)/\1 train_loss \d+\.\d+ valid_loss \d+\.\d+ tokens/s \d+",
                    lines[-2]), lines[-2]


def test_watch_json_prints_one_document_and_progress_on_stderr(watched):
    p = watched["json"]
    job = one_json(p)
    assert job["object"] == "fine_tuning.job" and job["status"] == "succeeded"
    assert job["training_file"] == watched["file"]["id"] and job["fine_tuned_model"].startswith("ft:gpt2:")
    assert f"{job['id']} succeeded step" in p.stderr


def test_watch_in_a_terminal_draws_a_live_bar(env, train_file, tenant, adapter):
    t = Pty(env, "jobs", "create", "--file", str(train_file), "--n-epochs", "8", "--batch-size", "2", "--watch",
            *SMALL)
    assert t.wait(120) == 0, t.text[-3000:]
    bar = r"running\s+\S*\s*(\d+)/(\d+) steps loss (\S+)\s+val (\S+) (\S+) tok/s\s+ETA (\d+:\d\d:\d\d)"
    states = re.findall(bar, t.text)
    steps = {int(s) for s, *_ in states}
    assert len(steps) >= 2, t.text[-3000:]  # the bar moved while we watched
    totals = {int(n) for _, n, *_ in states}
    assert len(totals) == 1 and max(steps) <= totals.pop()
    assert any(tps != "-" for *_, tps, _ in states)
    assert "\x1b[" in t.buf.decode(errors="replace")  # drawn in place, not printed line by line
    assert "succeeded" in t.text
    last = t.lines()[-1]
    assert re.fullmatch(rf"ft:gpt2:{tenant.id}::ftjob-[0-9a-f]+", last), t.lines()[-3:]


def test_ctrl_c_in_a_terminal_asks_and_cancels(env, train_file, tenant, adapter):
    t = Pty(env, "jobs", "create", "--file", str(train_file), "--n-epochs", "100", "--batch-size", "1", "--watch",
            *SMALL)
    job_id = t.expect(r"created (ftjob-[0-9a-f]+)").group(1)
    t.expect(r"running\s+\S*\s*\d+/\d+ steps loss \d")
    t.send(b"\x03")
    t.expect(rf"Cancel job {job_id}\? \[y/N\]")
    t.send(b"n\r")  # no: the bar comes back
    t.expect(rf"(?s){job_id} goes on; watching again.*running\s+\S*\s*\d+/\d+ steps")
    t.send(b"\x03")
    t.expect(rf"(?s)watching again.*Cancel job {job_id}\? \[y/N\]")
    t.send(b"y\r")
    t.expect(rf"cancellation of {job_id} requested")
    assert t.wait(60) == 130
    assert f"{job_id} was cancelled" in t.text
    assert tenant.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"


# ----------------------------------------------------------------------------- inference, models

def test_complete_and_chat_stream_the_api_s_text(env, svc, tenant, adapter):
    client = svc.openai(tenant.key)
    sampling = {"max_tokens": 6, "temperature": 0}
    text = client.completions.create(model=adapter, prompt="item 7 is blue ->", **sampling).choices[0].text
    answer = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": "hello"}],
                                            **sampling).choices[0].message.content
    args = ("--model", adapter, "--max-tokens", "6", "--temperature", "0")
    with ThreadPoolExecutor(2) as pool:
        completed = pool.submit(cli, env, "complete", "item 7 is blue ->", *args)
        chatted = pool.submit(cli, env, "chat", *args, stdin="hello")  # the message from a pipe
    assert ok(completed.result()).stdout == text + "\n"
    assert ok(chatted.result()).stdout == answer + "\n"


def test_models_export_and_import_round_trip(env, svc, tenant, adapter, tmp_path):
    target = tmp_path / "adapter.zip"
    p = ok(cli(env, "models", "export", adapter, "-o", str(target)))
    assert p.stdout == f"wrote {target} ({target.stat().st_size} bytes)\n"
    with zipfile.ZipFile(target) as z:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
        assert json.loads(z.read("adapter_config.json"))["num_virtual_tokens"] == 4
    with ThreadPoolExecutor(2) as pool:
        again = pool.submit(cli, env, "models", "export", adapter, "-o", str(target))
        imported = pool.submit(cli, env, "models", "import", str(target), "--suffix", "back", "--json")
    assert again.result().returncode == 1 and "pass --force" in again.result().stderr
    m = one_json(imported.result())
    assert m["kind"] == "adapter" and re.fullmatch(rf"ft:gpt2:{tenant.id}:back:import-[0-9a-f]+", m["id"])
    client = svc.openai(tenant.key)
    outputs = {model: client.completions.create(model=model, prompt="item 3 is blue ->", max_tokens=6,
                                                temperature=0).choices[0].text for model in (adapter, m["id"])}
    assert outputs[adapter] == outputs[m["id"]]  # the same prefix, back under a new id
