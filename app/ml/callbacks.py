"""How training loops talk to whoever runs them (minGPT style): they fire callbacks.

The loops never import Celery, SQL or HTTP. A worker subclasses `TrainingCallbacks` to record
progress events and checkpoints in its database and to answer `should_stop()` from a cancel flag.
Shared by base training and prefix tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Progress:
    step: int  # optimizer steps done so far (counting steps before a resume)
    total_steps: int
    epoch: int  # 0-based epoch of the step just done
    train_loss: float  # mean loss per label token of the step just done
    valid_loss: float | None  # latest validation loss, None before the first evaluation
    tokens_per_s: float  # real (non-pad) tokens processed per second in this run
    eta_s: float  # estimated seconds to the last step
    trained_tokens: int  # real tokens processed so far (counting steps before a resume)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingCallbacks:
    """No-op defaults; override what you need."""

    def on_progress(self, progress: Progress) -> None:
        pass

    def should_stop(self) -> bool:
        """Checked before every optimizer step; True stops the loop cleanly (checkpoint, then return)."""
        return False

    def on_eval(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, metrics: dict) -> None:
        pass

    def on_search_rung(self, step: int, rung: dict) -> None:
        """A length search halved its candidates: `{"step", "losses": {length: valid_loss}, "kept"}`."""
