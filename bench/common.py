"""Helpers the benchmarks share: E2E data, a deterministic split by MR, the last-line JSON."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from recipes.common import data_root  # the one reader of PREFIXD_DATA_ROOT, shared with the recipes

REPO = Path(__file__).resolve().parents[1]


def e2e_csv() -> Path:
    """E2E's dev set: `E2E_CSV`, else `e2e/devset.csv` under the data root."""
    return Path(os.environ["E2E_CSV"]) if os.environ.get("E2E_CSV") else data_root() / "e2e" / "devset.csv"


def load_e2e(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(mr, ref) rows of the E2E CSV, in file order."""
    with open(path or e2e_csv(), newline="", encoding="utf-8") as f:
        return [(r["mr"].strip(), r["ref"].strip()) for r in csv.DictReader(f)]


def _bucket(mr: str, salt: str) -> float:
    """A stable number in [0, 1) per MR (sha256, so independent of order, Python version and seed)."""
    h = hashlib.sha256(f"{salt}:{mr}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_mr(
    rows: Sequence[tuple[str, str]], test_frac: float = 0.1, valid_frac: float = 0.05, salt: str = "e2e"
) -> dict[str, list[tuple[str, str]]]:
    """{'train', 'valid', 'test'} row lists. Every row of one MR lands in the same split, never in
    two, decided by a hash of the MR alone (deterministic, order independent)."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for mr, ref in rows:
        u = _bucket(mr, salt)
        part = "test" if u < test_frac else "valid" if u < test_frac + valid_frac else "train"
        out[part].append((mr, ref))
    return out


def limit_mrs(rows: Sequence[tuple[str, str]], n: int | None) -> list[tuple[str, str]]:
    """Keep the rows of the first `n` distinct MRs (file order); all rows when n is None."""
    if n is None:
        return list(rows)
    keep: list[str] = []
    for mr, _ in rows:
        if mr not in keep:
            keep.append(mr)
            if len(keep) == n:
                break
    chosen = set(keep)
    return [r for r in rows if r[0] in chosen]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The benchmark's last line: one JSON object on stdout."""
    print(json.dumps(result, sort_keys=True), flush=True)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
