"""`prefixd jobs`: create (optionally uploading the file first and watching to the end), list,
show, cancel, events, checkpoints, watch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from app.cli.common import JsonOpt, served_base, setup, to_dict
from app.cli.files import report_validation, upload_path
from app.cli.output import CLIError, Out, api_errors, when
from app.cli.watch import Watcher

app = typer.Typer(help="Fine-tuning jobs: create (and watch), list, show, cancel, events.", no_args_is_help=True)

Interval = Annotated[float, typer.Option(help="Seconds between two polls of the job", min=0.05)]


def _file_id(client, out: Out, value: str, purpose: str) -> str:
    """A file id as it is, or a local path uploaded (and validated) first."""
    path = Path(value)
    if path.is_file():
        f = upload_path(client, out, path, purpose)
        if f.status == "error":
            report_validation(out, f)
        return f.id
    if value.startswith("file-"):
        return value
    raise CLIError(f"--file {value!r} is neither a local file nor a file id (file-...)")


def _method(kind: str, n_epochs, batch_size, lr_multiplier, learning_rate, virtual_tokens, eval_every) -> dict:
    hp = {k: v for k, v in (("n_epochs", n_epochs), ("batch_size", batch_size),
                            ("learning_rate_multiplier", lr_multiplier), ("learning_rate", learning_rate),
                            ("eval_every", eval_every)) if v is not None}
    body: dict = {"hyperparameters": hp} if hp else {}
    if kind == "prefix" and virtual_tokens is not None:
        body["num_virtual_tokens"] = virtual_tokens
    return {"type": kind, kind: body} if body else {"type": kind}


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--metadata wants key=value, got {pair!r}")
        out[key] = value
    return out


@app.command("create")
def create(
    ctx: typer.Context,
    file: Annotated[str, typer.Option("--file", "-f", help="Training data: a file id, or a local path to upload")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="The base (default: the served base)")] = None,
    suffix: Annotated[str | None, typer.Option(help="The adapter id's suffix: 1-40 of a-z, 0-9 and -")] = None,
    validation_file: Annotated[str | None, typer.Option(help="Held-out data: a file id or a local path")] = None,
    method: Annotated[Literal["prefix", "base"], typer.Option(help="prefix tuning, or training a base")] = "prefix",
    n_epochs: Annotated[int | None, typer.Option(help="Passes over the data (default: auto)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default: auto)")] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option(help="Scales the default learning rate")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="The learning rate itself")] = None,
    num_virtual_tokens: Annotated[int | None, typer.Option(help="Prefix length P (default 16)")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: each epoch)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the run")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job to its end; print the adapter id")]
    = False,
    interval: Interval = 1.0,
    json_: JsonOpt = False,
) -> None:
    """Create a fine-tuning job. With --watch, draw its progress until it ends, print the adapter id
    (ft:...) last, and exit 0 only if it succeeded; Ctrl-C asks whether to cancel it."""
    cfg, out = setup(ctx, json_)
    purpose = "fine-tune" if method == "prefix" else "base-train"
    with api_errors(cfg.base_url):
        client = cfg.openai()
        training = _file_id(client, out, file, purpose)
        validation = _file_id(client, out, validation_file, purpose) if validation_file else None
        body = {"model": model or served_base(client), "training_file": training,
                "method": _method(method, n_epochs, batch_size, learning_rate_multiplier, learning_rate,
                                  num_virtual_tokens, eval_every)}
        for key, value in (("validation_file", validation), ("suffix", suffix), ("seed", seed),
                           ("metadata", _metadata(metadata))):
            if value is not None:
                body[key] = value
        job = client.fine_tuning.jobs.create(**body)
        if not watch:
            return _print_job(out, job)
        out.note(f"created {job.id} on {job.model}")
        job = Watcher(client, out, job.id, interval).run()
    _finish(out, job)


def _finish(out: Out, job) -> None:
    """The end of a watch: the adapter id (or the job under --json) on stdout, exit 0 on success."""
    if out.json:
        out.document(to_dict(job))
    if job.status == "succeeded":
        if not out.json:
            sys.stdout.write(f"{job.fine_tuned_model}\n")
            sys.stdout.flush()
        return
    if job.status == "failed":
        err = job.error
        detail = f"{err.message} ({err.code})" if err is not None and err.message else "no reason given"
        raise CLIError(f"{job.id} failed: {detail}")
    raise CLIError(f"{job.id} was {job.status}", exit_code=130 if job.status == "cancelled" else 1)


def _print_job(out: Out, job) -> None:
    if out.json:
        return out.document(to_dict(job))
    hp = job.hyperparameters.model_dump(exclude_none=True) if job.hyperparameters else {}
    out.fields([("id", job.id), ("status", job.status), ("model", job.model),
                ("fine_tuned_model", job.fine_tuned_model), ("training_file", job.training_file),
                ("validation_file", job.validation_file), ("method", job.method.type if job.method else None),
                ("hyperparameters", hp or None), ("trained_tokens", job.trained_tokens),
                ("created", when(job.created_at)), ("finished", when(job.finished_at)),
                ("error", job.error.message if job.error and job.error.message else None)])


@app.command("list")
def list_jobs(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
              json_: JsonOpt = False) -> None:
    """Your jobs, newest first."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        page = cfg.openai().fine_tuning.jobs.list(limit=limit)
    if out.json:
        return out.document(to_dict(page))
    out.table(["id", "status", "model", "fine_tuned_model", "created"],
              [(j.id, j.status, j.model, j.fine_tuned_model, when(j.created_at)) for j in page.data])


@app.command("show")
def show(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """One job."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        job = cfg.openai().fine_tuning.jobs.retrieve(job_id)
    _print_job(out, job)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """Cancel a job: at once when queued, within seconds when running."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        job = cfg.openai().fine_tuning.jobs.cancel(job_id)
    if out.json:
        return out.document(to_dict(job))
    out.note(f"{job.id}: {job.status}" + (" (stops within seconds)" if job.status == "running" else ""))


@app.command("events")
def events(ctx: typer.Context, job_id: str, limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
           json_: JsonOpt = False) -> None:
    """A job's latest events, oldest first (--json: the API's page, newest first)."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        page = cfg.openai().fine_tuning.jobs.list_events(job_id, limit=limit)
    if out.json:
        return out.document(to_dict(page))
    out.table(["created", "level", "type", "message"],
              [(when(e.created_at), e.level, e.type, e.message) for e in reversed(page.data)])


@app.command("checkpoints")
def checkpoints(ctx: typer.Context, job_id: str, limit: Annotated[int, typer.Option(min=1, max=100)] = 10,
                json_: JsonOpt = False) -> None:
    """A job's checkpoints, newest first; each is a model id you can complete with."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        page = cfg.openai().fine_tuning.jobs.checkpoints.list(job_id, limit=limit)
    if out.json:
        return out.document(to_dict(page))
    out.table(["step", "checkpoint", "metrics"],
              [(c.step_number, c.fine_tuned_model_checkpoint, to_dict(c.metrics) if c.metrics else None)
               for c in page.data])


@app.command("watch")
def watch(ctx: typer.Context, job_id: str, interval: Interval = 1.0, json_: JsonOpt = False) -> None:
    """Follow a job to its end, as `create --watch` does."""
    cfg, out = setup(ctx, json_)
    with api_errors(cfg.base_url):
        job = Watcher(cfg.openai(), out, job_id, interval).run()
    _finish(out, job)
