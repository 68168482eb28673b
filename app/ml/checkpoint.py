"""Training checkpoints of both trainers: one directory per step, safetensors + JSON, never pickled.

`root/step-00000123/` holds `tensors.safetensors` (weights, AdamW moments, RNG states and whatever
else a trainer keeps as tensors), `state.json` (the trainer's counters and run identity, with
`format` and `version`) and any files a trainer adds beside them (the base trainer's BPE). A
checkpoint is written into a temporary sibling and renamed, `state.json` last, so a reader sees the
whole checkpoint or none. Checkpoints travel through blob storage, where a download can be cut
short: the reader skips a checkpoint it cannot read and falls back to the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

VERSION = 1
TENSORS_FILE, STATE_FILE = "tensors.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    state: dict
    tensors: dict[str, torch.Tensor]


def save_checkpoint(root: Path, step: int, kind: str, tensors: dict[str, torch.Tensor], state: dict, keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `root/step-{step:08d}/` atomically and keep only the newest `keep` checkpoints.
    `kind` names the trainer (`format` in state.json): one trainer never resumes another's."""
    root.mkdir(parents=True, exist_ok=True)
    state = {"format": kind, "version": VERSION, **state}
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / TENSORS_FILE))
        if write_extra is not None:
            write_extra(tmp)
        with open(tmp / STATE_FILE, "w") as f:  # last: a directory without it is incomplete
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step written again (a cancel right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete-looking checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def read_checkpoint(path: Path, kind: str, check: Callable[[Path, dict], None] | None = None) -> Checkpoint:
    """One checkpoint directory; raises (OSError, ValueError, KeyError, SafetensorError) when it is
    not a whole checkpoint of `kind` and this version. `check(path, state)` may raise ValueError for
    what only the trainer knows is missing."""
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    if state.get("format") != kind or state.get("version") != VERSION:
        raise ValueError(f"not a {kind} checkpoint of version {VERSION}")
    if check is not None:
        check(path, state)
    return Checkpoint(path, state, load_file(str(path / TENSORS_FILE)))


def newest_checkpoint(root: Path, kind: str, check: Callable[[Path, dict], None] | None = None) -> Checkpoint | None:
    """The newest readable checkpoint of `kind` under `root`, or None."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(path, kind, check)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.warning("skipping unreadable checkpoint %s: %s", path, e)
    return None


# --------------------------------------------------------------------------- what trainers store


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's per-parameter state as tensors (`optim.{param id}.{name}`) and its param
    groups (JSON)."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"unexpected non-tensor optimizer state {k}")
            tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]):
    """The inverse of `optimizer_tensors` (torch moves each state tensor to its parameter's device)."""
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for g in param_groups:
        if isinstance(g.get("betas"), list):  # JSON has no tuples
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """The global torch RNG (and the device's CUDA RNG) as tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def to_json_float(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)  # NaN is not JSON


def from_json_float(x: float | None) -> float:
    return float("nan") if x is None else float(x)
