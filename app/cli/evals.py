"""`prefixd eval`: define an eval, run it on one or more models side by side, show results.

A client of OpenAI's Evals API (`client.evals`): `POST /v1/evals`, `POST /v1/evals/{id}/runs`,
`GET /v1/evals/{id}/runs/{run_id}`; the criteria and data shapes are in docs/EVALS.md. A server
without that API answers 404 on its routes, which is said in words.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import JsonOpt, served_base, setup, to_dict
from app.cli.output import CLIError, Out, api_errors

app = typer.Typer(help="Evals (OpenAI's Evals API): create, run models side by side, show.", no_args_is_help=True)

RUN_DONE = ("completed", "failed", "canceled", "cancelled")


@contextmanager
def evals_api(base_url: str):
    """api_errors, with a 404 from a route this server lacks said as such."""
    try:
        with api_errors(base_url):
            yield
    except CLIError as e:
        if e.status == 404 and (e.code is None or e.message.startswith("Unknown route")):
            raise CLIError(f"this server has no Evals API (404: {e.message})") from None
        raise


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CLIError(f"cannot read {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"{what} {path} is not JSON: line {e.lineno}: {e.msg}") from None


def read_items(path: Path) -> list[dict]:
    """JSONL rows as `{"item": {...}}` (rows already wrapped stay as they are)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CLIError(f"{path}: line {n}: not a JSON object")
        rows.append(row if set(row) <= {"item", "sample"} and "item" in row else {"item": row})
    if not rows:
        raise CLIError(f"{path} holds no rows")
    return rows


def data_source(model: str, data: str, template: str | None, max_tokens: int | None,
                temperature: float | None) -> dict:
    """A `completions` run data source: the model, its rows and how a row becomes its input."""
    source = ({"type": "file_id", "id": data} if data.startswith("file-") and not Path(data).exists()
              else {"type": "file_content", "content": read_items(Path(data))})
    ds: dict = {"type": "completions", "model": model, "source": source}
    if template is not None:
        try:
            parsed = json.loads(template)
        except json.JSONDecodeError:
            parsed = template  # a plain prompt string: a completion (non-chat) run
        if isinstance(parsed, str) and parsed.startswith("item."):
            ds["input_messages"] = {"type": "item_reference", "item_reference": parsed}
        else:
            ds["input_messages"] = {"type": "template", "template": parsed}
    sampling = {k: v for k, v in (("max_completion_tokens", max_tokens), ("temperature", temperature))
                if v is not None}
    if sampling:
        ds["sampling_params"] = sampling
    return ds


def results_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """One row per testing criterion, one column per run's model: passed/graded and mean score."""
    columns = ["criterion", *[r.get("model") or (r.get("data_source") or {}).get("model") or r["id"] for r in runs]]
    names: list[str] = []
    for r in runs:
        for c in r.get("per_testing_criteria_results") or []:
            if c["testing_criteria"] not in names:
                names.append(c["testing_criteria"])
    rows = []
    for name in names:
        row = [name]
        for r in runs:
            res = next((c for c in r.get("per_testing_criteria_results") or [] if c["testing_criteria"] == name), None)
            metrics = next((m for m in r.get("per_testing_criteria_metrics") or []
                            if m.get("testing_criteria", m.get("name")) == name), {})
            if res is None:
                row.append("-")
                continue
            cell = f"{res['passed']}/{res['passed'] + res['failed']} passed"
            if isinstance(metrics.get("mean_score"), (int, float)):
                cell += f", mean {metrics['mean_score']:.3f}"
            row.append(cell)
        rows.append(row)
    counts = ["items"]
    for r in runs:
        rc = r.get("result_counts") or {}
        counts.append(f"{rc.get('passed', 0)} passed, {rc.get('failed', 0)} failed, {rc.get('errored', 0)} errored"
                      f" of {rc.get('total', 0)}")
    rows.append(counts)
    return columns, rows


@app.command("create")
def create(ctx: typer.Context,
           config: Annotated[Path, typer.Argument(help="A JSON file: the body of POST /v1/evals (name, "
                                                       "data_source_config, testing_criteria)")],
           json_: JsonOpt = False) -> None:
    """Define an eval; prints its id."""
    cfg, out = setup(ctx, json_)
    body = _load_json(config, "eval config")
    if not isinstance(body, dict):
        raise CLIError(f"{config} must hold a JSON object")
    known = {k: body[k] for k in ("name", "data_source_config", "testing_criteria", "metadata") if k in body}
    extra = {k: v for k, v in body.items() if k not in known}
    with evals_api(cfg.base_url):
        ev = cfg.openai().evals.create(**known, extra_body=extra or None)
    if out.json:
        return out.document(to_dict(ev))
    out.fields([("id", ev.id), ("name", ev.name), ("criteria", [c.name for c in ev.testing_criteria])])


@app.command("run")
def run(ctx: typer.Context, eval_id: str,
        data: Annotated[str, typer.Option("--data", "-d", help="A local JSONL of items, or a file id")],
        model: Annotated[list[str] | None, typer.Option("--model", "-m", help="A model to evaluate, repeatable "
                                                                              "(default: the served base)")] = None,
        template: Annotated[str | None, typer.Option(help="How an item becomes the input: a prompt string "
                                                          "('Review: {{item.text}} ->'), a JSON list of "
                                                          "messages, or item.<field> holding messages")] = None,
        max_tokens: Annotated[int | None, typer.Option(help="max_completion_tokens of each sample")] = None,
        temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0: greedy)")] = 0.0,
        wait: Annotated[bool, typer.Option(help="Wait for the runs and show their results")] = True,
        interval: Annotated[float, typer.Option(min=0.05, help="Seconds between polls")] = 1.0,
        json_: JsonOpt = False) -> None:
    """Run an eval on each --model (say, an adapter and its base) and show each criterion side by side."""
    cfg, out = setup(ctx, json_)
    with evals_api(cfg.base_url):
        client = cfg.openai()
        models = model or [served_base(client)]
        runs = []
        for m in models:
            r = client.evals.runs.create(eval_id, data_source=data_source(m, data, template, max_tokens, temperature))
            out.note(f"run {r.id} on {m}: {r.status}")
            runs.append(r)
        if wait:
            runs = [_wait(client, out, eval_id, r.id, interval) for r in runs]
    docs = [to_dict(r) for r in runs]
    if out.json:
        return out.document({"object": "list", "data": docs})
    columns, rows = results_rows(docs)
    out.table(columns, rows)
    failed = [r["id"] for r in docs if r.get("status") in ("failed", "canceled", "cancelled")]
    if failed:
        raise CLIError(f"run(s) {', '.join(failed)} did not complete")


def _wait(client, out: Out, eval_id: str, run_id: str, interval: float):
    while True:
        r = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if r.status in RUN_DONE:
            out.note(f"run {r.id}: {r.status}")
            return r
        time.sleep(interval)


@app.command("show")
def show(ctx: typer.Context, eval_id: str,
         run_id: Annotated[str | None, typer.Argument(help="One of its runs (default: the eval itself)")] = None,
         json_: JsonOpt = False) -> None:
    """An eval, or one of its runs with its per-criterion results."""
    cfg, out = setup(ctx, json_)
    with evals_api(cfg.base_url):
        client = cfg.openai()
        obj = client.evals.runs.retrieve(run_id, eval_id=eval_id) if run_id else client.evals.retrieve(eval_id)
    doc = to_dict(obj)
    if out.json:
        return out.document(doc)
    if run_id:
        out.fields([("id", doc["id"]), ("status", doc.get("status")), ("model", doc.get("model"))])
        columns, rows = results_rows([doc])
        out.table(columns, rows)
    else:
        out.fields([("id", doc["id"]), ("name", doc.get("name")),
                    ("criteria", [c.get("name") for c in doc.get("testing_criteria") or []])])
