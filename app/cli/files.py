"""`prefixd files`: upload with a progress bar and the validation result, list, show, delete."""

from __future__ import annotations

import io
import mimetypes
import re
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from app.cli.common import JsonOpt, setup, to_dict
from app.cli.output import CLIError, Out, api_errors, when

app = typer.Typer(help="Datasets: upload (validated by the server), list, show, delete.", no_args_is_help=True)

Purpose = Literal["fine-tune", "base-train"]
VALIDATION_TIMEOUT_S = 600.0


class ProgressFile(io.FileIO):
    """A binary file that reports how far it has been read, so the upload can draw a bar."""

    def __init__(self, path: Path, on_read):
        super().__init__(path, "rb")
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self._on_read(self.tell())
        return data


def bad_lines(details: str | None) -> list[str]:
    """The server's `status_details` ("2 bad lines: line 3: not JSON; line 5: ...") one item a line."""
    if not details:
        return []
    head, sep, rest = details.partition(": ")
    if sep and re.fullmatch(r"\d+ bad lines?", head):
        return [head + ":", *re.split(r"; (?=line \d+:|\.\.\. and )", rest)]
    return [details]


def upload_path(client, out: Out, path: Path, purpose: str, wait: bool = True):
    """Upload one local file and (unless wait is False) wait for its validation; returns the file
    object. A file the server finds invalid is reported line by line on stderr and raises."""
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    size = path.stat().st_size
    mime = mimetypes.guess_type(path.name)[0] or ("application/jsonl" if path.suffix == ".jsonl" else "text/plain")
    if out.tty:
        bar = Progress(TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), console=out.notes, transient=True)
        with bar:
            task = bar.add_task(path.name, total=size)
            with ProgressFile(path, lambda n: bar.update(task, completed=n)) as fh:
                f = client.files.create(file=(path.name, fh, mime), purpose=purpose)
    else:
        out.note(f"uploading {path.name} ({size} bytes)")
        with ProgressFile(path, lambda n: None) as fh:
            f = client.files.create(file=(path.name, fh, mime), purpose=purpose)
    out.note(f"uploaded {path.name} as {f.id}")
    return wait_validated(client, out, f) if wait else f


def wait_validated(client, out: Out, f):
    deadline = time.monotonic() + VALIDATION_TIMEOUT_S
    status = out.notes.status(f"validating {f.id}") if out.tty else None
    if status is None:
        out.note(f"validating {f.id}")
    try:
        if status is not None:
            status.start()
        while f.status == "uploaded":
            if time.monotonic() > deadline:
                raise CLIError(f"{f.id} is still being validated after {VALIDATION_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
            f = client.files.retrieve(f.id)
    finally:
        if status is not None:
            status.stop()
    return f


def report_validation(out: Out, f) -> None:
    """The verdict, after the file object (so --json still prints its one document first)."""
    if f.status == "error":
        out.stderr.print(f"error: {f.id} ({f.filename}) is not a valid dataset:")
        for line in bad_lines(getattr(f, "status_details", None)):
            out.stderr.print(f"  {line}")
        raise typer.Exit(1)
    rows, tokens = getattr(f, "row_count", None), getattr(f, "token_count", None)
    out.note(f"{f.id}: {f.status}" + (f", {rows} rows, {tokens} tokens" if rows is not None else ""))


@app.command("upload")
def upload(ctx: typer.Context, file: Annotated[Path, typer.Argument(help="A local JSONL (or .txt) dataset")],
           purpose: Annotated[Purpose, typer.Option(help="fine-tune (prompt/completion or messages JSONL) or "
                                                         "base-train (text)")] = "fine-tune",
           wait: Annotated[bool, typer.Option(help="Wait for the server's validation")] = True,
           json_: JsonOpt = False) -> None:
    """Upload a dataset with a progress bar; then wait for the server's validation and show each bad
    line with its number (exit 1 when the file is invalid)."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        f = upload_path(cfg.openai(max_retries=0), out, file, purpose, wait)
    if out.json:
        out.document(to_dict(f))
    else:
        _show(out, f)
    if wait:
        report_validation(out, f)


def _show(out: Out, f) -> None:
    out.fields([("id", f.id), ("filename", f.filename), ("purpose", f.purpose), ("bytes", f.bytes),
                ("status", f.status), ("rows", getattr(f, "row_count", None)),
                ("tokens", getattr(f, "token_count", None)), ("created", when(f.created_at))])


@app.command("list")
def list_files(ctx: typer.Context, purpose: Annotated[str | None, typer.Option(help="Only this purpose")] = None,
               json_: JsonOpt = False) -> None:
    """Your files, newest first."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        page = cfg.openai().files.list(**({"purpose": purpose} if purpose else {}))
    if out.json:
        return out.document(to_dict(page))
    out.table(["id", "filename", "purpose", "status", "bytes", "rows", "created"],
              [(f.id, f.filename, f.purpose, f.status, f.bytes, getattr(f, "row_count", None), when(f.created_at))
               for f in page.data])


@app.command("show")
def show(ctx: typer.Context, file_id: str, json_: JsonOpt = False) -> None:
    """One file, with its validation details."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        f = cfg.openai().files.retrieve(file_id)
    if out.json:
        return out.document(to_dict(f))
    _show(out, f)
    for line in bad_lines(getattr(f, "status_details", None)):
        out.note(f"  {line}")


@app.command("delete")
def delete(ctx: typer.Context, file_id: str, json_: JsonOpt = False) -> None:
    """Delete a file (409 while an active job uses it)."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        res = cfg.openai().files.delete(file_id)
    if out.json:
        return out.document(to_dict(res))
    out.note(f"deleted {res.id}")
