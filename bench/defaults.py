"""Do the defaults work? All-default prefix training on the default base, word -> label task.

    python -m bench.defaults [--quick] [--base DIR] [--threads N]

Builds the `default` base with `build_default_base` into ./var/bench/default (or reuses it, or
loads `--base`), makes a synthetic task, trains a prefix with `PrefixTrainingConfig()` and nothing
else (what a job sending `{"type": "prefix"}` gets, including the service's held-out split), and
measures exact match of greedy generation (`app.ml.generate`, temperature 0) on unseen prompts,
for the base alone and with the prefix.

The task: "Item: the <adjective> <word> in the <place>. Category:" -> " <category>", 6 categories
of 6 words each. The label depends on one word; the adjective and the place are distractors.
- `held`: unseen prompts; every label word was seen in training, but with adjectives that never
  appear in training (unseen combinations). This is the headline `em_prefix`.
- `combos`: unseen prompts made of training words only (adjective, label word and place each seen
  in training, never together): `em_prefix_combos`, the easier reading of "unseen prompts".
- `new_words`: prompts whose label word never appears in training (reported, not required: the
  prefix can only get these from what the base knows about the words).

Last line: JSON with em_base, em_prefix, em_base_combos, em_prefix_combos, em_new_words,
train_seconds, base_build_seconds, ...
`--quick`: 200 training pairs and 60 held-out prompts instead of 360 and 150.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from app.ml.base import load_base
from app.ml.config import PrefixTrainingConfig
from app.ml.data import Example, encode_prompt
from app.ml.generate import GenerationRequest, generate
from app.ml.prefix import table_to_key_values
from app.ml.pretrain import build_default_base
from app.ml.train import train_prefix

REPO = Path(__file__).resolve().parents[1]

CATEGORIES = {
    "animal": ["dog", "cat", "horse", "bird", "cow", "fish", "mouse", "sheep"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "cake", "egg", "meat"],
    "tool": ["hammer", "knife", "saw", "drill", "spoon", "needle", "rope", "brush"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"],
    "city": ["Paris", "London", "Berlin", "Rome", "Tokyo", "Madrid", "Vienna", "Dublin"],
    "body": ["hand", "head", "foot", "arm", "leg", "nose", "ear", "knee"],
}
TRAIN_ADJ = ["small", "large", "old", "new", "nice", "strange", "simple", "common", "good", "bad",
             "cheap", "rare", "quiet", "fast", "slow", "plain", "dark", "light", "long", "short"]
HELD_ADJ = ["famous", "broken", "empty", "heavy", "strong", "clean", "warm", "cold"]
PLACES = ["house", "garden", "office", "street", "market", "school", "kitchen", "park", "shop", "room"]
N_SEEN_WORDS = 6  # per category; the last 2 words of each are the `new_words` split


def example(adj: str, word: str, place: str, cat: str) -> Example:
    return Example(f"Item: the {adj} {word} in the {place}. Category:", f" {cat}")


def make_task(n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[Example]]:
    rng = random.Random(seed)

    def sample(n, adjs, words_of, exclude=frozenset()):
        out, seen = [], set(exclude)  # prompts
        while len(out) < n:
            cat = rng.choice(list(CATEGORIES))
            ex = example(rng.choice(adjs), rng.choice(words_of(cat)), rng.choice(PLACES), cat)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
        return out

    seen_words = lambda c: CATEGORIES[c][:N_SEEN_WORDS]  # noqa: E731
    new_words = lambda c: CATEGORIES[c][N_SEEN_WORDS:]  # noqa: E731
    train = sample(n_train, TRAIN_ADJ, seen_words)
    held = sample(n_eval, HELD_ADJ, seen_words)
    new = sample(n_eval // 2, HELD_ADJ, new_words)
    # sampled last, so that the splits above stay what they always were
    combos = sample(n_eval, TRAIN_ADJ, seen_words, exclude={e.prompt for e in train})
    return {"train": train, "held": held, "new_words": new, "combos": combos}


@torch.no_grad()
def exact_match(base, examples: list[Example], prefix=None, batch: int = 32) -> float:
    ok = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        reqs = [GenerationRequest(encode_prompt(base.tokenizer, e.prompt), prefix=prefix, max_tokens=4,
                                  temperature=0.0) for e in chunk]
        for e, r in zip(chunk, generate(base, reqs), strict=False):
            ok += r.text.strip() == e.completion.strip()
    return ok / max(1, len(examples))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--base", default=None, help="an existing base directory (default: build/reuse ./var/bench/default)"
    )
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "2")))
    ap.add_argument("--config", default="{}", help="JSON overrides of PrefixTrainingConfig (experiments only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    build_s = 0.0
    path = args.base or str(REPO / "var" / "bench" / "default")
    if not args.base and not (Path(path) / "config.json").exists():
        t0 = time.perf_counter()
        build_default_base(path)
        build_s = time.perf_counter() - t0
    base = load_base(path)

    n_train, n_eval = (200, 60) if args.quick else (360, 150)
    task = make_task(n_train, n_eval)
    # what the service does for {"type": "prefix"}: ~10% of the prompts held out for validation
    from app.jobs.datasets import holdout_split

    train, valid = holdout_split(task["train"], 0)
    overrides = json.loads(args.config)
    config = PrefixTrainingConfig(**overrides)
    t0 = time.perf_counter()
    result = train_prefix(base, train, valid or None, config)
    train_s = time.perf_counter() - t0
    kv = table_to_key_values(result.table, result.prefix_config)

    out = {
        "em_base": exact_match(base, task["held"]),
        "em_prefix": exact_match(base, task["held"], kv),
        "em_base_combos": exact_match(base, task["combos"]),
        "em_prefix_combos": exact_match(base, task["combos"], kv),
        "em_prefix_train": exact_match(base, train[:n_eval], kv),
        "em_new_words": exact_match(base, task["new_words"], kv),
        "train_seconds": round(train_s, 1),
        "base_build_seconds": round(build_s, 1),
        "train_examples": len(train),
        "valid_examples": len(valid),
        "held_examples": len(task["held"]),
        "steps": result.steps,
        "best_valid_loss": result.metrics.get("best_valid_loss"),
        "train_loss": result.metrics.get("train_loss"),
        "config": overrides or "defaults",
        "base": path,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
