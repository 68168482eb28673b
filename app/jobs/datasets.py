"""Job data: read a validated file from blobs, split off a held-out set, write the results CSV."""

from __future__ import annotations

import csv
import io
import json
import random

HOLDOUT_MIN_ROWS = 50  # below this, no held-out split is made from the training file
HOLDOUT_FRACTION = 0.1
MAX_EVAL_PROMPTS = 200  # final base-vs-adapter evaluation runs on at most this many distinct prompts


class DataError(ValueError):
    pass


def read_jsonl(data: bytes, what: str) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 (byte {e.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{what} line {n}: not JSON") from None
        if not isinstance(rec, dict):
            raise DataError(f"{what} line {n}: not a JSON object")
        out.append(rec)
    if not out:
        raise DataError(f"{what} holds no examples")
    return out


def read_corpus(data: bytes, filename: str, what: str) -> list[str]:
    """A base-train corpus: JSONL of {"text"} or plain text (one document per blank-line block)."""
    if filename.endswith((".jsonl", ".json")):
        recs = read_jsonl(data, what)
        texts = [r.get("text") for r in recs]
        if not all(isinstance(t, str) and t for t in texts):
            raise DataError(f"{what}: every line needs a non-empty 'text'")
        return texts
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 (byte {e.start})") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"{what} is empty")
    return docs


def holdout_split(examples: list, seed: int, key=lambda ex: ex.prompt) -> tuple[list, list]:
    """(train, valid): with >= HOLDOUT_MIN_ROWS examples, about 10% of the distinct prompts (all
    their rows) go to valid, chosen by `seed`, so no prompt is on both sides. Else (all, [])."""
    if len(examples) < HOLDOUT_MIN_ROWS:
        return list(examples), []
    groups: dict = {}
    for ex in examples:
        groups.setdefault(key(ex), []).append(ex)
    if len(groups) < 2:
        return list(examples), []
    keys = list(groups)
    random.Random(f"holdout:{seed}").shuffle(keys)
    n_valid = max(1, round(len(keys) * HOLDOUT_FRACTION))
    held = set(keys[:n_valid])
    train = [ex for ex in examples if key(ex) not in held]
    valid = [ex for ex in examples if key(ex) in held]
    return train, valid


def eval_subset(examples: list, key=lambda ex: ex.prompt) -> list:
    """At most MAX_EVAL_PROMPTS distinct prompts (all their references), in first-seen order."""
    keep: set = set()
    out = []
    for ex in examples:
        k = key(ex)
        if k not in keep:
            if len(keep) >= MAX_EVAL_PROMPTS:
                continue
            keep.add(k)
        out.append(ex)
    return out


RESULT_COLUMNS = ("model", "step", "examples", "loss", "perplexity", "exact_match", "bleu", "chrf")


def results_csv(rows: list[dict]) -> bytes:
    """OpenAI-style results CSV: one header line, one row per evaluated model (base, adapter)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in RESULT_COLUMNS})
    return buf.getvalue().encode()
