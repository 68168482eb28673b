"""SST-2 sentiment (sentence level), a label task: `python -m recipes.sst2 --help`.

Data: sst2/stsa.binary.train (6,920 rows) to train, sst2/stsa.binary.dev (872) to evaluate;
each line is `LABEL SENTENCE` with label 0 (negative) or 1 (positive).
Format: prompt "Review: {sentence}\\nSentiment:", completion " positive" or " negative".
Scored with /v1/classify over the two labels: accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, main, task_file

LABELS = {"0": " negative", "1": " positive"}


def prompt(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


def read(path: Path) -> list[Example]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, _, sentence = line.partition(" ")
        if label not in LABELS or not sentence.strip():
            raise ValueError(f"{path}:{n}: expected 'LABEL SENTENCE' with label 0 or 1")
        rows.append(Example(prompt(sentence.strip()), LABELS[label]))
    return rows


def load(root: Path) -> Split:
    train = read(task_file(root, "sst2", "stsa.binary.train"))
    dev = read(task_file(root, "sst2", "stsa.binary.dev"))
    return Split(train, [EvalItem(e.prompt, e.completion.strip()) for e in dev])


def score(items, predicted):
    return scoring.labels(list(LABELS.values()), [it.gold for it in items], predicted, macro_f1=False)


RECIPE = Recipe(name="sst2", description="SST-2 sentiment, sentence -> label", load=load, score=score,
                headline="accuracy", labels=tuple(LABELS.values()), max_tokens=2)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
