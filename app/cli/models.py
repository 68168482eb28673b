"""`prefixd models`: list, show, export (PEFT zip), import, delete."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from app.cli.common import JsonOpt, setup, to_dict
from app.cli.output import CLIError, Out, api_errors, check, when

app = typer.Typer(help="Bases and adapters: list, show, export to PEFT, import, delete.", no_args_is_help=True)


def model_path(model_id: str) -> str:
    """`models/{id}` relative to /v1; ids hold ':' (ft:base:tenant:suffix:job), which stays as is."""
    return "models/" + quote(model_id, safe=":")


def _show(out: Out, m: dict) -> None:
    out.fields([(k, when(m[k]) if k == "created" else m.get(k))
                for k in ("id", "kind", "base", "served", "num_virtual_tokens", "job_id", "size_bytes",
                          "owned_by", "created") if k in m])


@app.command("list")
def list_models(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """The served base first, then other bases and your adapters."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        page = cfg.openai().models.list()
    if out.json:
        return out.document(to_dict(page))
    rows = [to_dict(m) for m in page.data]
    out.table(["id", "kind", "base", "served", "P", "created"],
              [(m["id"], m.get("kind"), m.get("base"), m.get("served"), m.get("num_virtual_tokens"),
                when(m.get("created"))) for m in rows])


@app.command("show")
def show(ctx: typer.Context, model_id: str, json_: JsonOpt = False) -> None:
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        m = to_dict(cfg.openai().models.retrieve(model_id))
    if out.json:
        return out.document(m)
    _show(out, m)


@app.command("export")
def export(ctx: typer.Context, model_id: str,
           output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the zip "
                                                                               "(default: <id>.zip here)")] = None,
           force: Annotated[bool, typer.Option(help="Overwrite an existing file")] = False,
           json_: JsonOpt = False) -> None:
    """Download an adapter as a PEFT prefix-tuning zip (adapter_config.json + adapter_model.safetensors)."""
    cfg, out = setup(ctx, json_)
    target = output or Path(re.sub(r"[^A-Za-z0-9._-]", "_", model_id) + ".zip")
    if target.exists() and not force:
        raise CLIError(f"{target} exists; pass --force to overwrite it")
    partial = target.with_name(target.name + ".part")
    try:
        size = _download(cfg, out, model_id, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    if out.json:
        return out.document({"object": "model.export", "model": model_id, "path": str(target), "bytes": size})
    out.note(f"wrote {target} ({size} bytes)")


def _download(cfg, out: Out, model_id: str, partial: Path) -> int:
    with api_errors(cfg.base_url), cfg.http() as http:
        with http.stream("GET", model_path(model_id) + "/export") as r:
            check(r)
            total = int(r.headers.get("content-length") or 0) or None
            size = 0
            with open(partial, "wb") as fh:
                bar = (Progress(TextColumn("exporting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                console=out.notes, transient=True) if out.tty else None)
                if bar is not None:
                    bar.start()
                    task = bar.add_task("export", total=total)
                try:
                    for chunk in r.iter_bytes():
                        fh.write(chunk)
                        size += len(chunk)
                        if bar is not None:
                            bar.update(task, completed=size)
                finally:
                    if bar is not None:
                        bar.stop()
    return size


@app.command("import")
def import_model(ctx: typer.Context, file: Annotated[Path, typer.Argument(help="A PEFT prefix-tuning zip")],
                 suffix: Annotated[str | None, typer.Option(help="1-40 of a-z, 0-9 and -")] = None,
                 json_: JsonOpt = False) -> None:
    """Import a PEFT prefix-tuning adapter for the served base; prints the new adapter's id."""
    cfg, out = setup(ctx, json_)
    if not file.is_file():
        raise CLIError(f"no such file: {file}")
    with api_errors(cfg.base_url), cfg.http() as http, open(file, "rb") as fh:
        r = check(http.post("models/import", files={"file": (file.name, fh, "application/zip")},
                            data={"suffix": suffix} if suffix else {}))
    m = r.json()
    if out.json:
        return out.document(m)
    _show(out, m)


@app.command("delete")
def delete(ctx: typer.Context, model_id: str, json_: JsonOpt = False) -> None:
    """Delete one of your adapters."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        res = cfg.openai().models.delete(model_id)
    if out.json:
        return out.document(to_dict(res))
    out.note(f"deleted {res.id}")
