"""Following a fine-tuning job until it ends: a live Rich bar in a terminal, a plain line per
update without one.

The job's progress lives in its events: each `metrics` event carries `step`, `total_steps`,
`train_loss`, `valid_loss`, `tokens_per_s` and `eta_s` (docs/EXTENSIONS.md), and the message that
announces the run carries `total_steps` before the first step. The job object gives the status and
the adapter id. Ctrl-C asks whether to cancel the job; answering no goes on watching.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

from app.cli.output import CLIError, Out

TERMINAL = ("succeeded", "failed", "cancelled")


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class JobProgress:
    """What the bar shows, folded from the job object and its events (oldest first)."""

    job_id: str
    status: str = "validating_files"
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    seen: set[str] = field(default_factory=set)

    def new_events(self, newest_first: list) -> list:
        """The events not seen before, oldest first; remembers them."""
        fresh = [e for e in newest_first if e.id not in self.seen]
        self.seen.update(e.id for e in fresh)
        return fresh[::-1]

    def apply_event(self, event) -> None:
        data = getattr(event, "data", None) or {}
        if not isinstance(data, dict):
            return
        if isinstance(data.get("total_steps"), int):
            self.total_steps = data["total_steps"]
        if event.type != "metrics":
            return
        if isinstance(data.get("step"), int) and data["step"] >= self.step:
            self.step = data["step"]
            for name in ("train_loss", "valid_loss"):  # valid_loss only after the first evaluation
                if _num(data.get(name)) is not None:
                    setattr(self, name, _num(data[name]))
            self.tokens_per_s = _num(data.get("tokens_per_s"))
            self.eta_s = _num(data.get("eta_s"))

    def apply_job(self, job) -> None:
        self.status = job.status
        if job.status == "succeeded" and self.total_steps:
            self.step, self.eta_s = self.total_steps, 0.0

    def fields(self) -> dict[str, str]:
        def f(x):
            return "-" if x is None else f"{x:.4f}"
        return {"train": f(self.train_loss), "valid": f(self.valid_loss),
                "tps": "-" if self.tokens_per_s is None else f"{self.tokens_per_s:.0f}",
                "eta": duration(self.eta_s),
                "steps": f"{self.step}/{self.total_steps if self.total_steps else '?'}"}

    def line(self) -> str:
        """One plain line, for a run without a terminal."""
        v = self.fields()
        return (f"{self.job_id} {self.status} step {v['steps']} train_loss {v['train']} valid_loss {v['valid']} "
                f"tokens/s {v['tps']} eta {v['eta']}")


class Watcher:
    def __init__(self, client, out: Out, job_id: str, interval: float = 1.0):
        self.client, self.out, self.job_id, self.interval = client, out, job_id, interval
        self.state = JobProgress(job_id)
        self.cancelled_here = False

    def run(self):
        """Follow the job to its end and return it (the openai job object)."""
        while True:
            try:
                return self._live() if self.out.tty else self._lines()
            except KeyboardInterrupt:
                self._interrupted()

    def _poll(self):
        job = self.client.fine_tuning.jobs.retrieve(self.job_id)
        events = self.client.fine_tuning.jobs.list_events(self.job_id, limit=100).data
        fresh = self.state.new_events(events)
        for e in fresh:
            self.state.apply_event(e)
        self.state.apply_job(job)
        return job, [e for e in fresh if e.type != "metrics"]

    def _lines(self):
        last = None
        while True:
            job, messages = self._poll()
            for e in messages:
                self.out.note(f"{self.job_id} event: {e.message}")
            line = self.state.line()
            if line != last:
                self.out.note(line)
                last = line
            if job.status in TERMINAL:
                return job
            time.sleep(self.interval)

    def _live(self):
        bar = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(),
                       TextColumn("{task.fields[steps]} steps"),
                       TextColumn("loss {task.fields[train]}  val {task.fields[valid]}"),
                       TextColumn("{task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
                       console=self.out.notes, refresh_per_second=8)
        with bar:
            task = bar.add_task(self.state.status, total=None, **self.state.fields())
            while True:
                job, messages = self._poll()
                for e in messages:
                    bar.console.print(f"  {e.message}")
                s = self.state
                bar.update(task, description=s.status, completed=s.step, total=s.total_steps, **s.fields())
                if job.status in TERMINAL:
                    bar.refresh()
                    return job
                time.sleep(self.interval)

    def _interrupted(self) -> None:
        if self.cancelled_here:
            raise CLIError(f"stopped watching {self.job_id}; its cancellation was requested", exit_code=130)
        if not sys.stdin.isatty():
            raise CLIError(f"stopped watching; {self.job_id} goes on (prefixd jobs watch {self.job_id}, "
                           f"prefixd jobs cancel {self.job_id})", exit_code=130)
        import click

        try:
            cancel = click.confirm(f"Cancel job {self.job_id}?", default=False, err=True)
        except (click.Abort, KeyboardInterrupt, EOFError):
            raise CLIError(f"stopped watching; {self.job_id} goes on", exit_code=130) from None
        if cancel:
            job = self.client.fine_tuning.jobs.cancel(self.job_id)
            self.cancelled_here = True
            self.out.note(f"cancellation of {self.job_id} requested ({job.status}); waiting for it to stop")
        else:
            self.out.note(f"{self.job_id} goes on; watching again")
