"""The worker side of a job: claim it, run the engine, record what happened.

`run_job(job_id)` is all a Celery task calls. It claims the job with a compare-and-set (a second
delivery of the same message does nothing), starts a heartbeat thread, and runs `run_prefix_job`
or `run_base_job`. The engine (`app.ml`) reports through `JobCallbacks`: progress becomes
"metrics" events and the job's `trained_tokens`/`estimated_finish`; each checkpoint directory is
uploaded to blobs under `checkpoints/{tenant}/{job}/` and recorded as a JobCheckpoint row;
`should_stop()` re-reads the cancel flag (at most once a second). A job that is picked up again
after its worker died downloads those files first, and the engine (`train_prefix` or `train_base`)
resumes from the newest complete one.

Failures never escape as tracebacks: the job ends `failed` with `{code, message}` and the
exception is logged.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.jobs import outbox, state, storage_full
from app.jobs.context import JobContext, default_context
from app.jobs.datasets import DataError, eval_subset, holdout_split, read_corpus, read_jsonl, results_csv
from app.jobs.hyperparameters import (
    HyperparameterError,
    base_training_config,
    prefix_training_config,
    searched_lengths,
)
from app.jobs.service import fine_tuned_model_id, new_base_id
from app.ml.adapter import adapter_from_bytes, adapter_to_bytes
from app.ml.base import load_base, resolve_device
from app.ml.callbacks import Progress, TrainingCallbacks
from app.ml.data import example_from_record
from app.ml.evaluate import evaluate
from app.ml.length_search import DEFAULT_TOLERANCE, search_prefix_length
from app.ml.pretrain import train_base
from app.ml.train import train_prefix
from app.store.base_registry import blob_prefix, materialize_base, record_base, upload_base
from app.store.storage import is_storage_full
from app.store.tables import File, Job, JobEvent, ModelRecord, Tenant, new_id
from app.tenancy.quotas import lock_tenant

log = logging.getLogger("prefixd.jobs")

METRICS_EVERY_STEPS = 10  # a "metrics" event at least this often
STOP_CHECK_INTERVAL_S = 1.0  # should_stop() reads the database at most this often
PROGRESS_WRITE_INTERVAL_S = 2.0


class JobFailure(Exception):
    """A failure the user can act on: its code and message go into the job's `error`."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class LostJob(Exception):
    """This worker no longer holds the job (requeued elsewhere): stop without writing results."""


# ----------------------------------------------------------------------------- entry point


def run_job(job_id: str, ctx: JobContext | None = None) -> str:
    """Claim and run one job. Returns what happened: 'missing', 'skipped' (not runnable or held
    by another worker), 'deferred' (tenant at its running-jobs quota; re-sent later), 'requeued'
    (the storage was full; retried later), or the job's final status ('succeeded', 'failed',
    'cancelled', 'lost')."""
    ctx = ctx or default_context()
    settings = ctx.settings
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    with ctx.session_factory() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("run_job: no job %s", job_id)
            return "missing"
        if job.status == state.QUEUED and _at_running_quota(s, job, settings):
            # it stays queued, owed a message again after the delay: a monitor sends it then
            # (the commit releases the tenant lock)
            delay = max(1.0, settings.job_monitor_interval_s * 2)
            outbox.write(s, job_id, job.tenant_id, delay_s=delay)
            s.commit()
            log.info("job %s waits: tenant %s is at its running-jobs quota", job_id, job.tenant_id)
            return "deferred"
        if not state.claim_job(s, job_id, worker_id, settings.job_stale_after_s):
            log.info("job %s not claimed (status %s): another delivery or not runnable", job_id, job.status)
            return "skipped"
        s.refresh(job)
        state.add_event(s, job, f"Job started on {socket.gethostname()} (attempt {job.attempts})")
        s.commit()
    return JobRun(ctx, job_id, worker_id).run()


def _at_running_quota(s, job: Job, settings) -> bool:
    tenant = s.get(Tenant, job.tenant_id)
    quota = (tenant.quotas or {}).get("running_jobs") if tenant else None
    if quota is None:
        quota = settings.max_running_jobs_per_tenant
    if quota is None or quota <= 0:
        return False
    # two workers starting two jobs of one tenant at once must not both see one slot free: the
    # tenant stays locked until claim_job commits (or the session closes on the deferred path)

    lock_tenant(s, job.tenant_id)
    running = s.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == job.tenant_id, Job.status == state.RUNNING))
    return running >= quota


# ----------------------------------------------------------------------------- one run


class JobRun:
    def __init__(self, ctx: JobContext, job_id: str, worker_id: str):
        self.ctx, self.job_id, self.worker_id = ctx, job_id, worker_id
        self.settings = ctx.settings
        self.lost = threading.Event()
        self._stop_hb = threading.Event()
        with ctx.session_factory() as s:
            job = s.get(Job, job_id)
            self.tenant_id, self.kind = job.tenant_id, job.kind
        self.ckpt_prefix = f"checkpoints/{self.tenant_id}/{job_id}/"
        self.local_dir = Path(self.settings.data_dir) / "jobs" / job_id

    # -- plumbing

    def session(self):
        return self.ctx.session_factory()

    def event(self, message: str, **kw) -> None:
        with self.session() as s:
            state.add_event(s, self.job_id, message, tenant_id=self.tenant_id, **kw)
            s.commit()

    def update(self, **values) -> None:
        """Heartbeat plus column updates; marks the run lost when the job is no longer ours."""
        with self.session() as s:
            if not state.heartbeat(s, self.job_id, self.worker_id, **values):
                self.lost.set()

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(self.settings.job_heartbeat_s, self.settings.job_stale_after_s / 3))
        while not self._stop_hb.wait(interval):
            try:
                self.update()
            except Exception:  # a database hiccup: try again next beat
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def run(self) -> str:
        hb = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.job_id}", daemon=True)
        hb.start()
        try:
            if self.kind == "prefix":
                return run_prefix_job(self)
            return run_base_job(self)
        except LostJob:
            log.warning("job %s: lost to another worker; results dropped", self.job_id)
            return "lost"
        except JobFailure as e:
            log.warning("job %s failed: %s: %s", self.job_id, e.code, e.message)
            return self.finish(state.FAILED, error={"code": e.code, "message": e.message, "param": e.param})
        except Exception as e:
            if is_storage_full(e):  # not the job's fault: it waits and resumes (app/jobs/storage_full.py)
                return storage_full.requeue_or_fail(self, e)
            log.exception("job %s: training error", self.job_id)
            msg = f"Training failed: {type(e).__name__}: {str(e)[:300]}"
            return self.finish(state.FAILED, error={"code": "training_error", "message": msg, "param": None})
        finally:
            self._stop_hb.set()
            hb.join(timeout=5)

    def finish(self, status: str, error: dict | None = None, add=(), event: str | None = None,
               within: Callable[[Any], Any] | None = None, **values) -> str:
        """The final write: rows in `add`, what `within(session)` writes, and the status change
        commit together, only if this worker still holds the job."""
        with self.session() as s:
            if not state.finish(s, self.job_id, self.worker_id, status, error, **values):
                s.rollback()
                self.lost.set()
                return "lost"
            for row in add:
                s.add(row)
            if within is not None:
                within(s)
            msg = event or {state.SUCCEEDED: "The job has successfully completed",
                            state.CANCELLED: "Job cancelled"}.get(status) or (error or {}).get("message", status)
            state.add_event(s, self.job_id, msg, tenant_id=self.tenant_id,
                            level="error" if status == state.FAILED else "info")
            s.commit()
        # a finished job (any outcome) is never resumed: its checkpoint files go
        self.cleanup_checkpoints(remove_blobs=True)
        return status

    # -- checkpoints: local dir <-> blobs

    def download_checkpoints(self) -> Path:
        """Fresh local checkpoint dir holding what blobs have (the authoritative copy)."""
        d = self.local_dir / "checkpoints"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        keys = self.ctx.blobs.list(self.ckpt_prefix)
        for key in keys:
            rel = key[len(self.ckpt_prefix):]
            if not rel or ".." in rel.split("/"):
                continue
            target = d / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.ctx.blobs.download_to(key, target)
        return d

    def upload_checkpoint(self, path: Path) -> str:
        """Upload one checkpoint directory (state.json last: a reader that sees it sees all), then
        drop blobs of checkpoints the trainer pruned locally."""
        root = path.parent
        prefix = f"{self.ckpt_prefix}{path.name}/"
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.name == "state.json")
        for f in files:
            self.ctx.blobs.put_file(prefix + f.relative_to(path).as_posix(), f)
        present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        for key in self.ctx.blobs.list(self.ckpt_prefix):
            top = key[len(self.ckpt_prefix):].split("/", 1)[0]
            if top not in present:
                self.ctx.blobs.delete(key)
        return prefix

    def cleanup_checkpoints(self, remove_blobs: bool) -> None:
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if remove_blobs:
            try:
                self.ctx.blobs.delete_prefix(self.ckpt_prefix)
            except Exception:
                log.warning("job %s: could not delete checkpoint blobs", self.job_id, exc_info=True)


class JobCallbacks(TrainingCallbacks):
    """The engine's callbacks, recorded in the database (throttled)."""

    def __init__(self, run: JobRun, model_id: str):
        self.run, self.model_id = run, model_id
        self._last_stop_check = 0.0
        self._stop = False
        self._last_metrics_step = -1
        self._last_write = 0.0
        self.last_progress: Progress | None = None
        self.stop_reason: str | None = None
        # a resumed run redoes the steps after its checkpoint: their metrics events are already there
        self._recorded_step = recorded_metrics_step(run)

    def should_stop(self) -> bool:
        if self.run.lost.is_set():
            return True
        t = time.monotonic()
        if self._stop or t - self._last_stop_check < STOP_CHECK_INTERVAL_S:
            return self._stop
        self._last_stop_check = t
        with self.run.session() as s:
            reason = state.stop_reason(s, self.run.job_id, self.run.worker_id)
        if reason == "lost":
            self.run.lost.set()
        self.stop_reason = reason
        self._stop = reason is not None
        return self._stop

    def on_progress(self, p: Progress) -> None:
        self.last_progress = p
        final = p.step >= p.total_steps
        due = p.step - self._last_metrics_step >= METRICS_EVERY_STEPS or final or self._last_metrics_step < 0
        if due and p.step > self._recorded_step:
            self._last_metrics_step = self._recorded_step = p.step
            data = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
                    "train_loss": _num(p.train_loss), "valid_loss": _num(p.valid_loss),
                    "tokens_per_s": _num(p.tokens_per_s), "trained_tokens": p.trained_tokens,
                    "eta_s": _num(p.eta_s)}
            self.run.event(f"Step {p.step}/{p.total_steps}: training loss={_fmt(p.train_loss)}"
                           + (f", validation loss={_fmt(p.valid_loss)}" if p.valid_loss is not None else ""),
                           type="metrics", data=data)
        t = time.monotonic()
        if final or t - self._last_write >= PROGRESS_WRITE_INTERVAL_S:
            self._last_write = t
            eta = p.eta_s if p.eta_s is not None and math.isfinite(p.eta_s) else None
            self.run.update(trained_tokens=int(p.trained_tokens),
                            estimated_finish=int(time.time() + eta) if eta is not None else None)

    def on_eval(self, step: int, metrics: dict) -> None:
        pass  # the next metrics event carries valid_loss

    def on_search_rung(self, step: int, rung: dict) -> None:
        losses = ", ".join(f"{n}: {_fmt(loss)}" for n, loss in rung["losses"].items())
        self.run.event(f"Length search at step {step}: validation loss by length {{{losses}}}; kept {rung['kept']}",
                       data={"step": step, "losses": {str(n): v for n, v in rung["losses"].items()},
                             "kept": rung["kept"]})

    def on_checkpoint(self, step: int, metrics: dict) -> None:
        # A worker that lost the job (requeued after a stall) must not touch the new holder's
        # checkpoint blobs: prove ownership first.
        self.run.update()
        if self.run.lost.is_set():
            return
        path = Path(metrics.get("checkpoint_path", ""))
        blob_prefix = self.run.upload_checkpoint(path) if path.is_dir() else None
        clean = {k: _num(v) if isinstance(v, float) else v for k, v in metrics.items()
                 if k != "checkpoint_path" and isinstance(v, (int, float, bool, str, type(None)))}
        with self.run.session() as s:
            job = s.get(Job, self.run.job_id)
            state.record_checkpoint(s, job, step, clean, blob_prefix, self.model_id)
            s.commit()


def recorded_metrics_step(run: JobRun) -> int:
    """The last step with a metrics event (-1 for none): events are deduplicated by step."""
    with run.session() as s:
        data = s.scalars(select(JobEvent.data).where(JobEvent.job_id == run.job_id, JobEvent.type == "metrics")
                         .order_by(JobEvent.seq.desc()).limit(1)).first()
    return int(data["step"]) if isinstance(data, dict) and isinstance(data.get("step"), int) else -1


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------- bases


_BASE_CACHE: dict[str, object] = {}  # one loaded base per worker process, reused across jobs


def materialize(run: JobRun, record: ModelRecord) -> Path:
    return Path(materialize_base(run.settings, run.ctx.blobs, record))


def job_device(settings):
    """The torch device jobs run on (DEVICE). A worker configured for a device its machine lacks
    fails each job with that reason, instead of training on the CPU unnoticed."""

    try:
        return resolve_device(settings.device)
    except ValueError as e:
        raise JobFailure("device_unavailable", f"The worker cannot run this job: {e}. Its operator must set "
                         "DEVICE to a device that machine has (auto, cpu, cuda or cuda:N).") from None


def load_base_cached(path: Path, record: ModelRecord, device="cpu"):
    key = f"{path}:{record.fingerprint}:{device}"
    if key not in _BASE_CACHE:
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = load_base(str(path), device=device)
    return _BASE_CACHE[key]


def release_cached_base() -> None:
    """Free the cached base (and its GPU memory) before a job that does not use it."""
    _BASE_CACHE.clear()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _base_record(run: JobRun, model_id: str) -> ModelRecord:
    with run.session() as s:
        record = s.scalar(select(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.kind == "base"))
        if record is None or record.tenant_id not in (None, run.tenant_id):
            raise JobFailure("model_not_found", f"The base model '{model_id}' no longer exists", "model")
        s.expunge(record)
    return record


def _get_base(run: JobRun, model_id: str):
    record = _base_record(run, model_id)
    return record, load_base_cached(materialize(run, record), record, job_device(run.settings))


def _read_file(run: JobRun, file_id: str) -> tuple[File, bytes]:
    with run.session() as s:
        f = s.scalar(select(File).where(File.id == file_id, File.tenant_id == run.tenant_id))
        if f is None:
            raise JobFailure("file_not_found", f"The file {file_id} no longer exists")
        s.expunge(f)
    return f, run.ctx.blobs.get_bytes(f.blob_key)


# ----------------------------------------------------------------------------- prefix jobs


def _examples(run: JobRun, records: list[dict], what: str, tokenizer):
    out = []
    for n, rec in enumerate(records, 1):
        try:
            out.append(example_from_record(rec, tokenizer))
        except ValueError as e:
            raise JobFailure(f"invalid_{what}", f"{what.replace('_', ' ')} example {n}: {e}", what) from None
    return out


def _searched_lengths(run: JobRun, spec: dict, base, train, valid) -> list[int] | None:
    """The lengths a search tries, or None for a plain job (also when there is nothing to validate
    a search on: then the job trains the default length and says so)."""
    if not isinstance(spec.get("num_virtual_tokens"), str | dict):
        return None
    if not valid:
        run.event("No validation data to compare prefix lengths on: training the default length")
        return None
    longest = max(len(base.tokenizer(x.prompt + x.completion)["input_ids"]) for x in train[:2000]) + 1
    try:
        return searched_lengths(spec, run.ctx.settings.max_num_virtual_tokens,
                                base.geometry.max_positions - longest)
    except (HyperparameterError, ValueError) as e:
        raise JobFailure("invalid_method", str(e), "method.prefix.num_virtual_tokens") from None


def run_prefix_job(run: JobRun) -> str:
    with run.session() as s:
        job = s.get(Job, run.job_id)
        s.expunge(job)
    spec = dict(job.method.get("prefix") or {})
    record, base = _get_base(run, job.model)
    ft_id = fine_tuned_model_id(job.model, job.tenant_id, job.suffix, job.id)

    try:
        train_records = read_jsonl(_read_file(run, job.training_file)[1], "training file")
        valid_records = (read_jsonl(_read_file(run, job.validation_file)[1], "validation file")
                         if job.validation_file else None)
    except DataError as e:
        raise JobFailure("invalid_training_file", str(e), "training_file") from None
    train = _examples(run, train_records, "training_file", base.tokenizer)
    if valid_records is not None:
        valid = _examples(run, valid_records, "validation_file", base.tokenizer)
        split_note = f"{len(valid)} validation examples from {job.validation_file}"
    else:
        train, valid = holdout_split(train, job.seed)
        split_note = (f"{len(valid)} held-out examples split from the training file" if valid
                      else "no validation data (fewer than 50 training examples)")

    cfg, resolved, total = prefix_training_config(spec, job.seed, len(train))
    candidates = _searched_lengths(run, spec, base, train, valid)
    if candidates:
        resolved["num_virtual_tokens"] = spec["num_virtual_tokens"]  # until the search has chosen
    if cfg.init == "adapter":
        cfg.init_adapter = _load_init_adapter(run, spec.get("init_adapter"), job.model)
    with run.session() as s:
        j = s.get(Job, run.job_id)
        j.method = {"type": "prefix", "prefix": resolved}
        j.hyperparameters = resolved["hyperparameters"]
        s.commit()

    ckpt_dir = run.download_checkpoints()
    resumed = [p.name for p in ckpt_dir.iterdir() if p.is_dir()]
    if resumed:
        run.event(f"Resuming from checkpoint {sorted(resumed)[-1]}")
    run.event(f"Training a prefix of {cfg.num_virtual_tokens} virtual tokens on {len(train)} examples "
              f"({split_note}); {total} steps", data={"total_steps": total, "train_examples": len(train),
                                                        "valid_examples": len(valid)})
    callbacks = JobCallbacks(run, ft_id)
    if candidates:
        tolerance = spec.get("length_search_tolerance")
        tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        run.event(f"Searching the prefix length among {candidates}: trained packed, halved by validation loss",
                  data={"candidates": candidates, "tolerance": tolerance})
        search = search_prefix_length(base, train, valid, cfg, candidates, tolerance=tolerance, callbacks=callbacks)
        result = search.result
        resolved = {**resolved, "num_virtual_tokens": search.chosen,
                    "length_search": {"candidates": candidates, "tolerance": tolerance, "curve": search.curve}}
        with run.session() as s:
            s.get(Job, run.job_id).method = {"type": "prefix", "prefix": resolved}
            s.commit()
        if not result.cancelled:
            run.event(f"Chose a prefix of {search.chosen} virtual tokens", data={"curve": search.curve})
    else:
        result = train_prefix(base, train, valid or None, cfg, callbacks, checkpoint_dir=ckpt_dir)
    if run.lost.is_set():
        raise LostJob()
    trained = int(result.metrics.get("trained_tokens") or 0)
    if result.cancelled:
        if callbacks.stop_reason == "suspended":
            raise JobFailure("tenant_suspended", "The job stopped because its tenant was suspended")
        return run.finish(state.CANCELLED, trained_tokens=trained)

    # final metrics, base alone vs. base + prefix, on the validation examples
    add: list = []
    result_files: list[str] = []
    eval_rows = []
    if valid:
        run.event(f"Evaluating the base and the adapter on {len(eval_subset(valid))} examples")
        eval_rows = evaluate_pair(base, valid, result.adapter, job.model, ft_id, result.steps)
        results_file = _results_file(run, eval_rows)
        add.append(results_file)
        result_files.append(results_file.id)


    result.adapter.metadata.update({"model_id": ft_id, "base_id": job.model, "job_id": job.id})
    blob = adapter_to_bytes(result.adapter)
    blob_key = f"adapters/{job.tenant_id}/{job.id}/adapter.zip"
    run.ctx.blobs.put_bytes(blob_key, blob)
    metrics = {k: _num(v) if isinstance(v, float) else v for k, v in result.metrics.items()
               if isinstance(v, (int, float, bool, type(None)))}
    add.append(ModelRecord(
        id=ft_id, kind="adapter", tenant_id=job.tenant_id, base_id=job.model, fingerprint=record.fingerprint,
        blob_key=blob_key, job_id=job.id, num_virtual_tokens=result.adapter.num_virtual_tokens,
        size_bytes=len(blob), details={"format": "prefixd-adapter-zip", "metrics": metrics,
                                       "evaluation": eval_rows, "suffix": job.suffix},
    ))
    status = run.finish(state.SUCCEEDED, add=add, fine_tuned_model=ft_id, trained_tokens=trained,
                        result_files=result_files)
    if status == "lost":
        run.ctx.blobs.delete(blob_key)
    return status


def _load_init_adapter(run: JobRun, adapter_id: str | None, base_id: str):
    with run.session() as s:
        rec = s.scalar(select(ModelRecord).where(ModelRecord.id == adapter_id, ModelRecord.kind == "adapter",
                                                 ModelRecord.tenant_id == run.tenant_id))
        if rec is None or rec.base_id != base_id:
            raise JobFailure("model_not_found", f"The adapter '{adapter_id}' no longer exists",
                             "method.prefix.init_adapter")
        key = rec.blob_key
    return adapter_from_bytes(run.ctx.blobs.get_bytes(key))


def evaluate_pair(base, valid, adapter, base_id: str, ft_id: str, steps: int) -> list[dict]:
    """Loss, perplexity, exact match, BLEU and chrF of the base alone and of base + adapter."""

    examples = eval_subset(valid)
    longest = max(len(base.tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples)
    kw = {"max_new_tokens": max(4, min(128, longest + 4))}
    rows = []
    for name, prefix, step in ((base_id, None, 0), (ft_id, adapter, steps)):
        m = evaluate(base, examples, prefix, **kw)
        rows.append({"model": name, "step": step, "examples": len(examples),
                     **{k: _num(m.get(k)) for k in ("loss", "perplexity", "exact_match", "bleu", "chrf")}})
    return rows


def _results_file(run: JobRun, rows: list[dict]) -> File:
    data = results_csv(rows)
    fid = new_id("file")
    key = f"files/{run.tenant_id}/{fid}"
    run.ctx.blobs.put_bytes(key, data)
    return File(id=fid, tenant_id=run.tenant_id, filename=f"{run.job_id}-results.csv", purpose="fine-tune-results",
                bytes=len(data), status="processed", row_count=len(rows), blob_key=key)


# ----------------------------------------------------------------------------- base jobs


def run_base_job(run: JobRun) -> str:
    """Train a base from scratch (model 'scratch') or continue training a base; register the
    result as a base owned by the tenant, which prefix jobs may then target.

    Checkpoints go the way of a prefix job's (local dir -> blobs under `checkpoints/{tenant}/{job}/`
    -> JobCheckpoint rows), so a base job whose worker died resumes on the next worker from its last
    checkpoint, with the same data order, optimizer state and tokenizer."""

    with run.session() as s:
        job = s.get(Job, run.job_id)
        s.expunge(job)
    spec = dict(job.method.get("base") or {})
    f, data = _read_file(run, job.training_file)
    try:
        texts = read_corpus(data, f.filename, "training file")
        valid_texts = None
        if job.validation_file:
            vf, vdata = _read_file(run, job.validation_file)
            valid_texts = read_corpus(vdata, vf.filename, "validation file")
    except DataError as e:
        raise JobFailure("invalid_training_file", str(e), "training_file") from None

    init_dir = None
    if job.model != "scratch":  # train_base loads it from the directory: no cached copy needed
        init_dir = materialize(run, _base_record(run, job.model))
    device = job_device(run.settings)
    release_cached_base()  # a base kept for prefix jobs would hold memory that training needs
    try:
        cfg, resolved = base_training_config(spec)
    except HyperparameterError as e:
        raise JobFailure("invalid_method", str(e), e.param) from None
    arch, size = resolved["architecture"], resolved["size"]
    with run.session() as s:
        j = s.get(Job, run.job_id)
        j.method = {"type": "base", "base": resolved}
        j.hyperparameters = resolved["hyperparameters"]
        s.commit()

    slug = new_base_id(job.suffix, job.id)
    ckpt_dir = run.download_checkpoints()  # what a dead worker left in blobs, if anything
    resumed = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    if resumed:
        run.event(f"Resuming from checkpoint {resumed[-1]}")
    out_dir = run.local_dir / "base"
    shutil.rmtree(out_dir, ignore_errors=True)
    run.event(f"Training a base ({'a new ' + arch + '/' + size if init_dir is None else 'continuing ' + job.model})"
              f" on {len(texts)} documents")
    callbacks = JobCallbacks(run, slug)
    # checkpoint_every=None: the engine spaces ~10 checkpoints over the run once it knows the step
    # count (it depends on the tokenized corpus), at least one every 200 steps
    result = train_base(str(out_dir), texts, valid_texts, init_from=str(init_dir) if init_dir else None,
                        architecture=arch, size=size, config=cfg, seed=job.seed, callbacks=callbacks,
                        corpus_name=f.filename, checkpoint_dir=str(ckpt_dir), checkpoint_every=None,
                        device=device)
    if run.lost.is_set():
        raise LostJob()
    trained = int(result.metrics.get("trained_tokens") or 0) or None
    if result.cancelled:
        if callbacks.stop_reason == "suspended":
            raise JobFailure("tenant_suspended", "The job stopped because its tenant was suspended")
        return run.finish(state.CANCELLED, trained_tokens=trained)

    final = Path(run.settings.data_dir).resolve() / "models" / slug
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(out_dir, final)
    metrics = {k: _num(v) if isinstance(v, float) else v for k, v in result.metrics.items()
               if isinstance(v, (int, float, bool, str, type(None)))}
    # a prefix of this attempt's own: a worker that lost the job must not touch the new holder's upload
    upload = upload_base(run.ctx.blobs, final, f"{blob_prefix(slug)}{secrets.token_hex(6)}/", result.fingerprint)
    details = {"job_id": job.id, "architecture": arch, "size": size, "metrics": metrics,
               "continued_from": None if init_dir is None else job.model}
    status = run.finish(state.SUCCEEDED, fine_tuned_model=slug, trained_tokens=trained,
                        within=lambda s: record_base(s, slug, upload, job.tenant_id, job_id=job.id, details=details))
    if status == "lost":  # the record never committed: its files go too
        run.ctx.blobs.delete_prefix(upload.prefix)
    return status
