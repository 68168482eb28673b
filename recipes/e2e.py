"""E2E NLG table-to-text: `python -m recipes.e2e --help`.

Data: e2e/devset.csv (4,672 `mr,ref` rows over 547 meaning representations). It is split by MR:
a seeded 10% of the distinct MRs is held out for evaluation, so no MR is on both sides; every
reference of a training MR is a training row.
Format: prompt "{mr} =>", completion " {ref}" (the flow of issue 14, section 3).
Scored per MR against all its references: corpus BLEU and chrF (sacrebleu, 0-100), ROUGE-L F
(0-1) against the best reference, averaged.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, hold_out, main, task_file

HOLD_OUT = 0.10


def prompt(mr: str) -> str:
    return f"{mr} =>"


def read(root: Path) -> dict[str, list[str]]:
    """{mr: [references]} in file order."""
    refs: dict[str, list[str]] = {}
    with open(task_file(root, "e2e", "devset.csv"), encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["mr"].strip() and r["ref"].strip():
                refs.setdefault(r["mr"].strip(), []).append(r["ref"].strip())
    return refs


def load(root: Path) -> Split:
    refs = read(root)
    held = hold_out(list(refs), HOLD_OUT)
    train = [Example(prompt(mr), " " + ref) for mr, rs in refs.items() if mr not in held for ref in rs]
    items = [EvalItem(prompt(mr), rs) for mr, rs in refs.items() if mr in held]
    return Split(train, items)


def score(items, outputs):
    return scoring.corpus_text(outputs, [it.gold for it in items], rouge_l=True)


RECIPE = Recipe(name="e2e", description="E2E NLG, meaning representation -> text", load=load, score=score,
                headline="bleu", max_tokens=80)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
