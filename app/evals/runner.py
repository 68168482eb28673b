"""The worker side of an eval run: claim it, generate and grade every item, record the results.

`run_eval(run_id)` is all the Celery task (`worker.tasks.run_eval`) calls. Unlike the rest of
`app.evals` this module does SQL and runs the model; the grading itself is the pure core's
(`grade_item`, `summarize_run`).

- The claim is a compare-and-set (`queued` -> `in_progress`, or a run whose worker's heartbeat went
  stale), so a second delivery of the message does nothing. Every later write matches on
  `in_progress` and this worker's id: a run canceled (the API sets `canceled`) or deleted meanwhile
  stops after the batch being decoded, without writing over what the user did.
- The rows stream from the eval file (or the run's inline content) one batch at a time: the file
  is never held whole. Each item's prompt is rendered from `input_messages` (chat messages go
  through the base's chat template, or `/v1/chat/completions`'s plain fallback when it has none),
  generated with the run's sampling parameters through `app.ml.generate.DecodeBatch`, graded, and
  written as an output item; progress (`result_counts`, `per_testing_criteria_results`) is
  written with each batch.
- **An adapter's run also decodes every item on the adapter's base**, as rows with no prefix in
  the same mixed-prefix batches, and grades them with the same criteria: the base's results are
  stored beside the adapter's (`base_*`), never mixed into `per_testing_criteria_results`.
- A heartbeat thread proves the worker alive; a run whose worker died is queued again by the job
  monitor (`app.evals.dispatch`), and the next worker skips the items already written.
- At the end `summarize_run` reads the output items back page by page, for the run's model and
  for the base.

Failures never escape as tracebacks: the run ends `failed` with `{code, message}`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.evals import (
    InputTemplate,
    ItemError,
    ItemOutcome,
    Sample,
    content_rows,
    grade_item,
    jsonl_rows,
    parse_input_messages,
    summarize_run,
    validate_eval,
)
from app.jobs.context import default_context
from app.jobs.runner import load_base_cached
from app.ml.adapter import adapter_from_bytes
from app.ml.base import resolve_device
from app.ml.data import encode_prompt, format_chat
from app.ml.evaluate import prefix_key_values
from app.ml.generate import DecodeBatch, GenerationFailedError, GenerationRequest, score
from app.store.base_registry import materialize_base
from app.store.eval_tables import EvalRecord, EvalRunOutputItemRecord, EvalRunRecord
from app.store.tables import File, ModelRecord, now

log = logging.getLogger("prefixd.evals")

BATCH_ITEMS = 16  # items decoded together (an adapter run decodes twice as many rows)
SUMMARY_PAGE = 500


class RunFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class RunStopped(Exception):
    """The run is no longer this worker's to write (canceled, deleted, or taken over)."""


# ----------------------------------------------------------------------------- entry point


def run_eval(run_id: str, ctx=None) -> str:
    """Claim and run one eval run. Returns 'missing', 'skipped', or its final status."""
    if ctx is None:
        ctx = default_context()
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    with ctx.session_factory() as s:
        if s.get(EvalRunRecord, run_id) is None:
            log.warning("run_eval: no run %s", run_id)
            return "missing"
        t = time.time()
        stale = t - ctx.settings.job_stale_after_s
        res = s.execute(update(EvalRunRecord).where(
            EvalRunRecord.id == run_id,
            or_(EvalRunRecord.status == "queued",
                and_(EvalRunRecord.status == "in_progress",
                     or_(EvalRunRecord.heartbeat_at.is_(None), EvalRunRecord.heartbeat_at < stale))))
            .values(status="in_progress", worker_id=worker_id, heartbeat_at=t, started_at=now(),
                    attempts=EvalRunRecord.attempts + 1).execution_options(synchronize_session=False))
        s.commit()
        if res.rowcount != 1:
            log.info("eval run %s not claimed: another delivery, or not runnable", run_id)
            return "skipped"
    return EvalRun(ctx, run_id, worker_id).run()


# ----------------------------------------------------------------------------- one run


@dataclass
class _Item:
    line: int
    item: Any
    prompt: Any = None  # rendered: text or messages
    ids: list[int] | None = None
    error: str | None = None
    outcome: ItemOutcome | None = None
    sample: dict = field(default_factory=dict)
    base_outcome: ItemOutcome | None = None
    base_sample: dict | None = None


@dataclass
class _Usage:
    model: str
    invocations: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.invocations += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def to_dict(self) -> dict:
        return {"model_name": self.model, "invocation_count": self.invocations, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "cached_tokens": 0}


class EvalRun:
    def __init__(self, ctx, run_id: str, worker_id: str):
        self.ctx, self.run_id, self.worker_id = ctx, run_id, worker_id
        self.settings = ctx.settings

    def session(self):
        return self.ctx.session_factory()

    def _mine(self):
        return (EvalRunRecord.id == self.run_id, EvalRunRecord.status == "in_progress",
                EvalRunRecord.worker_id == self.worker_id)

    def _write_run(self, s, **values) -> None:
        res = s.execute(update(EvalRunRecord).where(*self._mine())
                        .values(heartbeat_at=time.time(), **values).execution_options(synchronize_session=False))
        if res.rowcount != 1:
            raise RunStopped()

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Beats while a batch decodes (a slow model can take longer than the stale threshold)."""
        interval = max(0.2, min(self.settings.job_heartbeat_s, self.settings.job_stale_after_s / 3))
        while not stop.wait(interval):
            try:
                with self.session() as s:
                    s.execute(update(EvalRunRecord).where(*self._mine()).values(heartbeat_at=time.time())
                              .execution_options(synchronize_session=False))
                    s.commit()
            except Exception:  # a database hiccup: try again next beat
                log.warning("eval run %s: heartbeat failed", self.run_id, exc_info=True)

    def run(self) -> str:
        stop = threading.Event()
        hb = threading.Thread(target=self._heartbeat_loop, args=(stop,), name=f"heartbeat-{self.run_id}",
                              daemon=True)
        hb.start()
        try:
            return self._run_guarded()
        finally:
            stop.set()
            hb.join(timeout=5)

    def _run_guarded(self) -> str:
        try:
            return self._run()
        except RunStopped:
            log.info("eval run %s stopped: canceled, deleted or taken over", self.run_id)
            with self.session() as s:
                r = s.get(EvalRunRecord, self.run_id)
                return r.status if r is not None else "deleted"
        except RunFailure as e:
            return self._fail(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a run fails with a reason, never a traceback to the user
            log.exception("eval run %s failed", self.run_id)
            return self._fail("internal_error", f"The run failed: {type(e).__name__}: {e}"[:1000])

    def _fail(self, code: str, message: str) -> str:
        with self.session() as s:
            s.execute(update(EvalRunRecord).where(*self._mine()).values(
                status="failed", finished_at=now(), error={"code": code, "message": message})
                .execution_options(synchronize_session=False))
            s.commit()
            r = s.get(EvalRunRecord, self.run_id)
            return r.status if r is not None else "deleted"

    # -- setup

    def _load(self):
        with self.session() as s:
            run = s.get(EvalRunRecord, self.run_id)
            ev = s.scalar(select(EvalRecord).where(EvalRecord.id == run.eval_id, EvalRecord.tenant_id == run.tenant_id))
            if ev is None:
                raise RunStopped()
            s.expunge_all()
        return run, ev

    def _model(self, tenant_id: str, model_id: str):
        """(base record, adapter record or None)."""
        with self.session() as s:
            rec = s.scalar(select(ModelRecord).where(ModelRecord.id == model_id, or_(
                ModelRecord.tenant_id.is_(None), ModelRecord.tenant_id == tenant_id)))
            if rec is None:
                raise RunFailure("model_not_found", f"The model '{model_id}' no longer exists")
            adapter = None
            if rec.kind == "adapter":
                adapter, rec = rec, s.scalar(select(ModelRecord).where(
                    ModelRecord.id == rec.base_id, ModelRecord.kind == "base"))
                if rec is None:
                    raise RunFailure("model_not_found", f"The base of '{model_id}' no longer exists")
            s.expunge_all()
        return rec, adapter

    def _rows(self, run: EvalRunRecord) -> Iterator[tuple[int, Any]]:
        source = run.data_source["source"]
        if source["type"] == "file_content":
            yield from content_rows(source["content"])
            return
        with self.session() as s:
            f = s.scalar(select(File).where(File.id == source["id"], File.tenant_id == run.tenant_id))
            key = f.blob_key if f is not None else None
        if key is None:
            raise RunFailure("file_not_found", f"The file {source['id']} no longer exists")
        with self.ctx.blobs.open(key) as fh:
            yield from jsonl_rows(fh)

    def _done_items(self) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(EvalRunOutputItemRecord.datasource_item_id)
                                 .where(EvalRunOutputItemRecord.run_id == self.run_id)))

    # -- the run

    def _run(self) -> str:
        run, ev = self._load()
        spec = validate_eval(ev.data_source_config, ev.testing_criteria)
        tmpl = parse_input_messages(run.data_source["input_messages"], spec.item_schema)
        sampling = run.data_source["sampling_params"]
        base_rec, adapter_rec = self._model(run.tenant_id, run.model)
        try:
            device = resolve_device(self.settings.device)
        except ValueError as e:
            raise RunFailure("device_unavailable", f"The worker cannot run this eval: {e}") from None
        base = load_base_cached(Path(materialize_base(self.settings, self.ctx.blobs, base_rec)), base_rec, device)
        base.model.eval()  # the cached base may come from a training job
        prefix = None
        if adapter_rec is not None:
            adapter = adapter_from_bytes(self.ctx.blobs.get_bytes(adapter_rec.blob_key))
            dtype = next(base.model.parameters()).dtype
            prefix = prefix_key_values(adapter, dtype, base.device)

        usage = _Usage(run.model)
        base_usage = _Usage(base_rec.id) if prefix is not None else None
        decoder = _Decoder(base, prefix, sampling, spec.criteria, tmpl, run.model, base_rec.id)
        counts = _Progress(spec.criteria)
        base_counts = _Progress(spec.criteria) if prefix is not None else None
        done = self._done_items()
        rows = (r for r in self._rows(run) if r[0] not in done)
        if done:
            counts.restore(self, False)
            if base_counts is not None:
                base_counts.restore(self, True)
        while True:
            batch = [_Item(line, item) for line, item in islice(rows, BATCH_ITEMS)]
            if not batch:
                break
            decoder.run(batch, usage, base_usage)
            self._write_batch(run, batch, counts, base_counts, usage, base_usage)

        with self.session() as s:
            summary = summarize_run(spec.criteria, self._outcomes(False)).to_dict()
            base_summary = None
            if prefix is not None:
                base_summary = {**summarize_run(spec.criteria, self._outcomes(True)).to_dict(), "model": base_rec.id}
            self._write_run(s, status="completed", finished_at=now(), summary=summary, base_summary=base_summary,
                            per_model_usage=[u.to_dict() for u in (usage, base_usage) if u is not None])
            s.commit()
        return "completed"

    def _write_batch(self, run, batch: list[_Item], counts, base_counts, usage, base_usage) -> None:
        for it in batch:
            counts.add(it.outcome)
            if base_counts is not None:
                base_counts.add(it.base_outcome)
        with self.session() as s:
            # the run first: a canceled or deleted run writes no more items
            self._write_run(s, summary=counts.summary(),
                            base_summary=base_counts.summary() if base_counts is not None else None,
                            per_model_usage=[u.to_dict() for u in (usage, base_usage) if u is not None])
            for it in batch:
                o = it.outcome
                s.add(EvalRunOutputItemRecord(
                    run_id=run.id, eval_id=run.eval_id, tenant_id=run.tenant_id, status=o.status,
                    datasource_item_id=it.line, datasource_item=it.item if isinstance(it.item, dict) else {},
                    results=[r.to_dict() for r in o.results], sample=it.sample, error=o.error,
                    base_status=it.base_outcome.status if it.base_outcome is not None else None,
                    base_results=[r.to_dict() for r in it.base_outcome.results] if it.base_outcome else None,
                    base_sample=it.base_sample))
            try:
                s.commit()
            except IntegrityError:  # deleted meanwhile, or another worker wrote these items
                s.rollback()
                raise RunStopped() from None

    def _outcomes(self, base: bool) -> Iterator[dict]:
        status_col = EvalRunOutputItemRecord.base_status if base else EvalRunOutputItemRecord.status
        results_col = EvalRunOutputItemRecord.base_results if base else EvalRunOutputItemRecord.results
        last = 0
        while True:
            with self.session() as s:
                item = EvalRunOutputItemRecord
                page = s.execute(select(item.seq, status_col, results_col, item.error)
                                 .where(item.run_id == self.run_id, item.seq > last)
                                 .order_by(item.seq).limit(SUMMARY_PAGE)).all()
            if not page:
                return
            for _seq, status, results, error in page:
                yield {"status": status or "error", "results": results or [], "error": error}
            last = page[-1][0]


class _Progress:
    """result_counts and per-criterion pass/fail counts so far (what a run shows while it runs)."""

    def __init__(self, criteria):
        self.criteria = criteria
        self.counts = {"total": 0, "passed": 0, "failed": 0, "errored": 0}
        self.per = {c.name: [0, 0] for c in criteria}

    def add(self, outcome: ItemOutcome) -> None:
        self.counts["total"] += 1
        self.counts[{"pass": "passed", "fail": "failed", "error": "errored"}[outcome.status]] += 1
        for r in outcome.results:
            if r.error is None and r.name in self.per:
                self.per[r.name][0 if r.passed else 1] += 1

    def restore(self, run: EvalRun, base: bool) -> None:
        for o in run._outcomes(base):
            self.add(ItemOutcome.from_dict(o))

    def summary(self) -> dict:
        return {"result_counts": dict(self.counts),
                "per_testing_criteria_results": [{"testing_criteria": n, "passed": p, "failed": f}
                                                 for n, (p, f) in self.per.items()],
                "per_testing_criteria_metrics": None}


class _Decoder:
    """Renders, generates and grades a batch of items; an adapter run's base rows go in the same
    DecodeBatch (rows with no prefix beside rows with the adapter's)."""

    def __init__(self, base, prefix, sampling: dict, criteria, tmpl: InputTemplate, model: str, base_model: str):
        self.base, self.prefix, self.sampling, self.criteria, self.tmpl = base, prefix, sampling, criteria, tmpl
        self.model, self.base_model = model, base_model
        self.P = 0 if prefix is None else int(prefix[0][0].shape[1])
        self.max_tokens = int(sampling["max_completion_tokens"])

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return format_chat(prompt, self.base.tokenizer, add_generation_prompt=True)

    def _prepare(self, it: _Item) -> None:
        try:
            it.prompt = self.tmpl.render(it.item)
            text = self._prompt_text(it.prompt)
        except ItemError as e:
            it.error = str(e)
            return
        except Exception as e:  # noqa: BLE001 - a chat template that rejects these messages
            it.error = f"the messages cannot be formatted: {e}"
            return
        tok = self.base.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = encode_prompt(tok, text) or [bos]
        limit = int(self.base.geometry.max_positions) - self.P - self.max_tokens
        if len(ids) > limit:
            it.error = (f"the prompt has {len(ids)} tokens; with the prefix ({self.P}) and max_completion_tokens "
                        f"({self.max_tokens}) the model's context leaves room for {max(0, limit)}")
            return
        it.ids = ids

    def _request(self, it: _Item, prefix):
        s = self.sampling
        return GenerationRequest(prompt_ids=list(it.ids), prefix=prefix, max_tokens=self.max_tokens,
                                 temperature=float(s["temperature"]), top_p=float(s["top_p"]), seed=int(s["seed"]))

    def run(self, batch: list[_Item], usage: _Usage, base_usage: _Usage | None) -> None:
        for it in batch:
            self._prepare(it)
        live = [it for it in batch if it.ids is not None]
        results: dict[tuple[int, bool], Any] = {}
        if live:
            db = DecodeBatch(self.base)
            keys, reqs = [], []
            for k, it in enumerate(live):
                keys.append((k, False))
                reqs.append(self._request(it, self.prefix))
                if base_usage is not None:
                    keys.append((k, True))
                    reqs.append(self._request(it, None))
            results.update(db.add(reqs, keys))
            while len(db):
                results.update(db.step())
        index = {id(it): k for k, it in enumerate(live)}
        for it in batch:
            k = index.get(id(it))
            it.outcome, it.sample = self._grade(it, results.get((k, False)) if k is not None else None,
                                                self.prefix, self.model, usage)
            if base_usage is not None:
                it.base_outcome, it.base_sample = self._grade(it, results.get((k, True)) if k is not None else None,
                                                              None, self.base_model, base_usage)

    def _grade(self, it: _Item, res, prefix, model: str, usage: _Usage) -> tuple[ItemOutcome, dict]:
        s = self.sampling
        messages = it.prompt if isinstance(it.prompt, list) else (
            [{"role": "user", "content": it.prompt}] if isinstance(it.prompt, str) else [])
        sample = {"input": messages, "output": [], "finish_reason": None, "model": model,
                  "usage": {"total_tokens": 0, "completion_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0},
                  "error": None, "temperature": s["temperature"], "max_completion_tokens": self.max_tokens,
                  "top_p": s["top_p"], "seed": s["seed"]}
        if it.error is not None or res is None or isinstance(res, GenerationFailedError):
            message = it.error or str(res) or "generation failed"
            sample["error"] = {"code": "item_error" if it.error else "generation_failed", "message": message}
            return ItemOutcome.errored(message), sample
        usage.add(res.prompt_tokens, res.completion_tokens)
        sample.update(output=[{"role": "assistant", "content": res.text}], finish_reason=res.finish_reason,
                      usage={"total_tokens": res.prompt_tokens + res.completion_tokens,
                             "completion_tokens": res.completion_tokens, "prompt_tokens": res.prompt_tokens,
                             "cached_tokens": 0})
        return grade_item(self.criteria, it.item, Sample(res.text, it.ids),
                          score_labels=self._score_labels(prefix)), sample

    def _score_labels(self, prefix):
        """score_labels(prompt ids, labels) -> [(summed log-prob, tokens)], under this row's prefix."""

        tok = self.base.tokenizer

        def score_labels(prompt_ids, labels):
            label_ids = [list(tok(label, add_special_tokens=False)["input_ids"]) for label in labels]
            if any(not x for x in label_ids):
                raise ItemError("a label encodes to no tokens")
            longest = max(len(x) for x in label_ids)
            if len(prompt_ids) + longest + self.P > int(self.base.geometry.max_positions):
                raise ItemError("the prompt and the longest label do not fit in the model's context")
            lps = score(self.base, list(prompt_ids), label_ids, prefix)
            return [(lp, len(x)) for lp, x in zip(lps, label_ids, strict=True)]

        return score_labels
