"""What every recipe shares: the data root, arguments, the HTTP calls, waiting, evaluating, printing.

A recipe module holds only its task: how its public files become prompt/completion rows and
evaluation items (a `Split`), and how outputs are scored. `main(recipe)` does the rest:

1. check that the server has what the recipe needs (the model, /v1/completions or /v1/classify,
   prefix jobs), before anything is uploaded;
2. upload the training rows as JSONL (purpose `fine-tune`);
3. start a prefix job (only the hyperparameters given on the command line; the rest stay `auto`)
   and wait for it, with progress on stderr;
4. evaluate the adapter, and the base beside it, on the evaluation items: greedy completions
   stopped at the end of a line, or /v1/classify for label tasks;
5. print a small table, then one JSON line (the last line of stdout).

Exit status: 0 done, 1 the job failed or was cancelled, 2 a usage error or a feature the server
lacks (the message says which).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT_ENV = "PREFIXD_DATA_ROOT"
# Fixed, so that every run (and the benchmark) sees the same train / evaluation split; --seed
# changes the job's seed and which rows a --train-rows / --eval-rows subset takes, never the split.
SPLIT_SEED = 0
# Job polling: quick after each status change (a short job ends in seconds), then backing off to a
# few seconds, so that a long job costs the server one request now and then.
POLL_MIN_S, POLL_MAX_S = 0.3, 5.0


class RecipeError(Exception):
    """A problem the user can act on (missing data, a feature the server lacks, a refused request)."""


class JobFailed(Exception):
    pass


class TooLong(RecipeError):
    """The server refused one prompt because it does not fit the model's context."""


# ------------------------------------------------------------------------------------- data

def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder that holds sst2/, trec/, qasrl/, multi30k/, e2e/ and wnut17/:
    `explicit`, else $PREFIXD_DATA_ROOT, else ../shared/data beside the repository."""
    raw = explicit or os.environ.get(DATA_ROOT_ENV)
    root = Path(raw) if raw else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        how = "--data-root" if explicit else (f"${DATA_ROOT_ENV}" if raw else f"${DATA_ROOT_ENV} (or --data-root)")
        raise RecipeError(f"data root {root} is not a directory: point {how} at the folder that holds "
                          "sst2/, trec/, qasrl/, multi30k/, e2e/ and wnut17/")
    return root


def task_file(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    if not path.is_file():
        raise RecipeError(f"missing data file {path} (under the data root {root})")
    return path


@dataclass(frozen=True)
class Example:
    """One training row of our JSONL."""

    prompt: str
    completion: str

    def row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt and what scoring needs to judge its output: a label, a list of
    acceptable answers, references, or entities, as the recipe's `score` understands it."""

    prompt: str
    gold: Any


@dataclass(frozen=True)
class Split:
    train: list[Example]
    eval: list[EvalItem]


def hold_out(keys: Sequence[Any], fraction: float, seed: int = SPLIT_SEED) -> set[Any]:
    """A seeded `fraction` of the distinct `keys` (sorted first, so the answer does not depend on
    the order they were read in)."""
    distinct = sorted(set(keys))
    random.Random(seed).shuffle(distinct)
    return set(distinct[: max(1, round(len(distinct) * fraction))])


def sample(rows: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """`n` rows taken at random with `seed` (all of them, shuffled, when n is None)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


# ------------------------------------------------------------------------------------- recipes

Score = Callable[[Sequence[EvalItem], Sequence[str]], dict[str, float]]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    load: Callable[[Path], Split]
    score: Score  # (items, outputs) -> metrics; for label tasks the outputs are the predicted labels
    headline: str  # the metric named first, higher is better
    labels: tuple[str, ...] | None = None  # a label task: scored with /v1/classify over these
    max_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)


# ------------------------------------------------------------------------------------- HTTP

class Api:
    """The few calls a recipe makes, with OpenAI error envelopes turned into RecipeError."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(8):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError as e:
                raise RecipeError(f"cannot reach {self.base_url}{path}: {e}") from None
            if r.status_code != 429 or attempt == 7:
                return r
            # a quota or a full queue: wait as told, then try again
            time.sleep(min(30.0, float(r.headers.get("Retry-After") or 1 + attempt)))
        return r

    def json(self, method: str, path: str, *, feature: str | None = None, **kw) -> dict:
        r = self.request(method, path, **kw)
        if r.status_code == 200:
            return r.json()
        if r.status_code == 400 and _param(r) in ("prompt", "input") and "context length" in _message(r):
            raise TooLong(_message(r))
        raise self.error(r, path, feature)

    def error(self, r: httpx.Response, path: str, feature: str | None) -> RecipeError:
        message = _message(r)
        if r.status_code == 401:
            return RecipeError(f"{self.base_url}{path}: the API key was refused (401): {message}")
        if feature and (r.status_code in (404, 405) and _is_unknown_route(r)):
            return RecipeError(f"this server lacks {feature}: {r.request.method} {self.base_url}{path} "
                               f"answered {r.status_code} ({message})")
        return RecipeError(f"{r.request.method} {self.base_url}{path} answered {r.status_code}: {message}")


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200] or r.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            param = f" (param {err['param']})" if err.get("param") else ""
            return f"{err['message']}{param}"
        if body.get("detail"):
            return str(body["detail"])
    return r.text[:200]


def _param(r: httpx.Response) -> str | None:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("param") if isinstance(err, dict) else None


def _is_unknown_route(r: httpx.Response) -> bool:
    """A route the server does not have, not a model or file it does not know: ours says
    'Unknown route', a bare framework says 'Not Found', and 405 means the path exists for
    other methods only."""
    if r.status_code == 405:
        return True
    msg = _message(r)
    return msg.startswith("Unknown route") or msg == "Not Found" or not msg


def check_server(api: Api, recipe: Recipe, model: str) -> None:
    """Fail before uploading anything when the server cannot run this recipe."""
    try:
        listed = api.json("GET", "/models", feature="the model list (GET /v1/models)")
    except RecipeError as e:
        if not api.base_url.endswith("/v1"):
            raise RecipeError(f"{e} (--base-url usually ends in /v1)") from None
        raise
    ids = [m.get("id") for m in listed.get("data", [])]
    if model not in ids:
        bases = [i for i in ids if i and not i.startswith("ft:")]
        raise RecipeError(f"model {model!r} is not served here; bases: {', '.join(bases) or 'none'}")
    if recipe.labels:
        api.json("POST", "/classify", json={"model": model, "input": "a", "labels": list(recipe.labels)},
                 feature=f"label scoring (POST /v1/classify), which the {recipe.name} recipe uses to "
                         "classify")
    else:
        r = api.request("POST", "/completions", json={"model": model, "prompt": "a", "max_tokens": 1,
                                                      "temperature": 0, "stop": list(recipe.stop)})
        if r.status_code != 200:
            if r.status_code == 400 and "stop" in _message(r):
                raise RecipeError(f"this server lacks stop strings on /v1/completions, which the {recipe.name} "
                                  f"recipe needs to end outputs: {_message(r)}")
            raise api.error(r, "/completions", f"text completion (POST /v1/completions), which the "
                                                f"{recipe.name} recipe evaluates with")


def upload(api: Api, name: str, rows: Sequence[Example]) -> str:
    body = "".join(json.dumps(e.row(), ensure_ascii=False) + "\n" for e in rows).encode()
    f = api.json("POST", "/files", files={"file": (name, body, "application/jsonl")}, data={"purpose": "fine-tune"},
                 feature="file upload (POST /v1/files)")
    return f["id"]


def start_job(api: Api, model: str, file_id: str, suffix: str, seed: int, prefix: dict) -> dict:
    body = {"model": model, "training_file": file_id, "suffix": suffix, "seed": seed,
            "method": {"type": "prefix", "prefix": prefix}}
    r = api.request("POST", "/fine_tuning/jobs", json=body)
    if r.status_code == 200:
        return r.json()
    msg = _message(r)
    if r.status_code == 400 and "method" in msg and "prefix" in msg:
        raise RecipeError(f"this server lacks prefix-tuning jobs (method.type 'prefix'): {msg}")
    raise api.error(r, "/fine_tuning/jobs", "fine-tuning jobs (POST /v1/fine_tuning/jobs)")


def wait_for(api: Api, job: dict, timeout_s: float, log=None) -> dict:
    """Poll the job until it ends, printing its status changes and training metrics to `log`."""
    log = log or sys.stderr
    deadline = time.monotonic() + timeout_s
    status, last_step = None, None
    delay = POLL_MIN_S
    while True:
        if job["status"] != status:
            status = job["status"]
            delay = POLL_MIN_S
            print(f"[{job['id']}] {status}", file=log, flush=True)
        if status in ("succeeded", "failed", "cancelled"):
            break
        events = [] if status != "running" else api.json(
            "GET", f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 5}).get("data", [])
        for ev in events:  # newest first
            data = ev.get("data") or {}
            if ev.get("type") == "metrics" and data.get("step") != last_step:
                last_step = data.get("step")
                parts = [f"step {data.get('step')}/{data.get('total_steps')}"]
                for key in ("train_loss", "valid_loss"):
                    if isinstance(data.get(key), int | float):
                        parts.append(f"{key} {data[key]:.3f}")
                if isinstance(data.get("eta_s"), int | float):
                    parts.append(f"eta {data['eta_s']:.0f}s")
                print(f"[{job['id']}] " + ", ".join(parts), file=log, flush=True)
                break
        if time.monotonic() > deadline:
            raise JobFailed(f"job {job['id']} still {status} after {timeout_s:.0f} s (it keeps running; "
                            f"cancel it with POST /v1/fine_tuning/jobs/{job['id']}/cancel)")
        time.sleep(delay)
        delay = min(POLL_MAX_S, delay * 1.5)
        job = api.json("GET", f"/fine_tuning/jobs/{job['id']}")
    if status != "succeeded":
        err = job.get("error") or {}
        raise JobFailed(f"job {job['id']} {status}: {err.get('code')}: {err.get('message')}")
    return job


# ------------------------------------------------------------------------------------- evaluation

def complete(api: Api, model: str, prompt: str, recipe: Recipe, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": list(recipe.stop)}
    out = api.json("POST", "/completions", json=body, feature="text completion (POST /v1/completions)")
    return out["choices"][0]["text"].strip()


def classify(api: Api, model: str, prompt: str, recipe: Recipe) -> str:
    """The label with the highest summed log-probability as the continuation of the prompt."""
    out = api.json("POST", "/classify", json={"model": model, "input": prompt, "labels": list(recipe.labels)},
                   feature="label scoring (POST /v1/classify)")
    best = max(out["data"], key=lambda d: d["logprob"])
    return best["label"].strip()


def outputs_of(api: Api, model: str, recipe: Recipe, items: Sequence[EvalItem], *, max_tokens: int,
               concurrency: int) -> list[str | None]:
    """`model`'s output for each item (None: the prompt does not fit its context); the requests go
    out together so that the server batches them."""
    def one(item: EvalItem) -> str | None:
        try:
            if recipe.labels:
                return classify(api, model, item.prompt, recipe)
            return complete(api, model, item.prompt, recipe, max_tokens)
        except TooLong:
            return None

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, items))


def evaluate(api: Api, models: dict[str, str], recipe: Recipe, items: Sequence[EvalItem], *, max_tokens: int,
             concurrency: int) -> tuple[dict[str, dict[str, float]], dict[str, list[str]], int]:
    """(metrics per model, outputs per model, items dropped). The models run side by side (the
    server batches an adapter's rows with the base's). Every model is scored on the same items: one
    whose prompt does not fit some model's context (the adapter's prefix takes room too) is
    dropped for all of them."""
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        futures = {label: pool.submit(outputs_of, api, model, recipe, items, max_tokens=max_tokens,
                                      concurrency=concurrency) for label, model in models.items()}
        outputs = {label: f.result() for label, f in futures.items()}
    keep = [i for i in range(len(items)) if all(outs[i] is not None for outs in outputs.values())]
    if not keep:
        raise RecipeError(f"no evaluation prompt fits the context of {', '.join(models.values())}")
    kept = [items[i] for i in keep]
    kept_out = {label: [outs[i] for i in keep] for label, outs in outputs.items()}
    scores = {label: recipe.score(kept, outs) for label, outs in kept_out.items()}
    return scores, kept_out, len(items) - len(keep)


# ------------------------------------------------------------------------------------- output

def table(recipe: Recipe, columns: dict[str, dict[str, float]], n_items: int) -> str:
    names = list(next(iter(columns.values())).keys())
    head = ["metric", *columns]
    rows = [[name, *(_fmt(col.get(name)) for col in columns.values())] for name in names]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells):
        # the metric's name to the left, the numbers to the right
        padded = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    out = [f"{recipe.name}: {recipe.description} ({n_items} evaluation items)", line(head),
           "  ".join("-" * w for w in widths), *map(line, rows)]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------- main

def parser(recipe: Recipe) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m recipes.{recipe.name}",
                                 description=f"{recipe.description}: convert, upload, train a prefix, evaluate "
                                             "the adapter and the base (docs/RECIPES.md)")
    ap.add_argument("--base-url", default=os.environ.get("PREFIXD_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default=os.environ.get("PREFIXD_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                    help="a tenant's key (default: $PREFIXD_API_KEY, then $OPENAI_API_KEY)")
    ap.add_argument("--model", default="default", help="the base to tune (default: %(default)s)")
    ap.add_argument("--data-root", default=None, help=f"default: ${DATA_ROOT_ENV}, else ../shared/data")
    ap.add_argument("--train-rows", type=int, default=None, help="train on a random subset of this many rows")
    ap.add_argument("--eval-rows", type=int, default=200, help="evaluation items (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the job's seed and the subsets' (not the split)")
    ap.add_argument("--suffix", default=recipe.name)
    hp = ap.add_argument_group("prefix job (left out: the server's auto defaults)")
    hp.add_argument("--n-epochs", type=int)
    hp.add_argument("--batch-size", type=int)
    hp.add_argument("--learning-rate", type=float)
    hp.add_argument("--num-virtual-tokens", type=int)
    hp.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, default=None)
    hp.add_argument("--init", choices=("random", "text"))
    hp.add_argument("--init-text")
    ap.add_argument("--max-tokens", type=int, default=recipe.max_tokens, help="per output (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="evaluation requests in flight")
    ap.add_argument("--job-timeout", type=float, default=6 * 3600, help="seconds to wait for the job")
    ap.add_argument("--write-jsonl", metavar="DIR", help="also write the converted train/eval rows here")
    return ap


def prefix_settings(args: argparse.Namespace) -> dict:
    hyper = {k: v for k, v in (("n_epochs", args.n_epochs), ("batch_size", args.batch_size),
                               ("learning_rate", args.learning_rate)) if v is not None}
    prefix = {k: v for k, v in (("num_virtual_tokens", args.num_virtual_tokens),
                                ("prefix_projection", args.prefix_projection), ("init", args.init),
                                ("init_text", args.init_text)) if v is not None}
    if hyper:
        prefix["hyperparameters"] = hyper
    return prefix


def write_jsonl(out_dir: str, recipe: Recipe, train: Sequence[Example], items: Sequence[EvalItem]) -> None:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{recipe.name}.train.jsonl", "w", encoding="utf-8") as f:
        for e in train:
            f.write(json.dumps(e.row(), ensure_ascii=False) + "\n")
    with open(d / f"{recipe.name}.eval.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"prompt": it.prompt, "gold": it.gold}, ensure_ascii=False) + "\n")


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> dict:
    args = parser(recipe).parse_args(argv)
    if not args.api_key:
        raise RecipeError("no API key: pass --api-key or set $PREFIXD_API_KEY")
    t0 = time.monotonic()
    split = recipe.load(data_root(args.data_root))
    train = sample(split.train, args.train_rows, args.seed)
    items = sample(split.eval, args.eval_rows, args.seed)
    if not train or not items:
        raise RecipeError(f"nothing to do: {len(train)} training rows, {len(items)} evaluation items")
    print(f"{recipe.name}: {len(train)} of {len(split.train)} training rows, {len(items)} of {len(split.eval)} "
          "evaluation items", file=sys.stderr, flush=True)
    if args.write_jsonl:
        write_jsonl(args.write_jsonl, recipe, train, items)

    api = Api(args.base_url, args.api_key)
    try:
        check_server(api, recipe, args.model)
        file_id = upload(api, f"{recipe.name}-train.jsonl", train)
        job = start_job(api, args.model, file_id, args.suffix, args.seed, prefix_settings(args))
        job = wait_for(api, job, args.job_timeout)
        adapter = job["fine_tuned_model"]
        print(f"[{job['id']}] evaluating {adapter} and {args.model} on {len(items)} items", file=sys.stderr,
              flush=True)
        scores, outputs, dropped = evaluate(api, {"adapter": adapter, "base": args.model}, recipe, items,
                                            max_tokens=args.max_tokens, concurrency=args.concurrency)
    finally:
        api.close()
    if dropped:
        print(f"{recipe.name}: {dropped} of {len(items)} evaluation prompts do not fit the model's context and "
              "were left out for both models", file=sys.stderr)
    print(table(recipe, scores, len(items) - dropped))
    hyper = (job.get("method") or {}).get("prefix", {}).get("hyperparameters") or job.get("hyperparameters")
    return {"recipe": recipe.name, "model": args.model, "adapter": adapter, "job_id": job["id"],
            "headline": recipe.headline, "train_rows": len(train), "eval_rows": len(items) - dropped,
            "eval_dropped_too_long": dropped,
            "hyperparameters": hyper, "trained_tokens": job.get("trained_tokens"),
            "metrics": scores, "examples": {label: outs[:3] for label, outs in outputs.items()},
            "wall_s": round(time.monotonic() - t0, 1)}


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    try:
        result = run(recipe, argv)
    except RecipeError as e:
        print(f"{recipe.name}: error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"{recipe.name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0
