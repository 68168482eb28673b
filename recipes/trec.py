"""TREC question type (6 coarse classes), a label task: `python -m recipes.trec --help`.

Data: trec/TREC.train.raw (5,452 lines of `COARSE:fine QUESTION`). It has no development split,
so a seeded 10% of its distinct questions is held out for evaluation (every copy of a question
on the same side) and the rest is trained on.
Format: prompt "Question: {question}\\nType:", completion " {class word}" (the coarse class as
an English word: ABBR -> abbreviation, DESC -> description, ENTY -> entity, HUM -> human,
LOC -> location, NUM -> number). Scored with /v1/classify over the six words: accuracy and
macro-F1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, hold_out, main, task_file

CLASSES = {"ABBR": " abbreviation", "DESC": " description", "ENTY": " entity", "HUM": " human",
           "LOC": " location", "NUM": " number"}
HOLD_OUT = 0.10


def prompt(question: str) -> str:
    return f"Question: {question}\nType:"


def read(path: Path) -> list[tuple[str, str]]:
    """(question, coarse class) pairs. The file is Latin-1 (a few accented names)."""
    rows = []
    for n, line in enumerate(path.read_bytes().decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.partition(":")[0]
        if coarse not in CLASSES or not question.strip():
            raise ValueError(f"{path}:{n}: expected 'COARSE:fine QUESTION' with COARSE one of {', '.join(CLASSES)}")
        rows.append((question.strip(), coarse))
    return rows


def load(root: Path) -> Split:
    rows = read(task_file(root, "trec", "TREC.train.raw"))
    held = hold_out([q for q, _ in rows], HOLD_OUT)
    train = [Example(prompt(q), CLASSES[c]) for q, c in rows if q not in held]
    # a question that repeats is evaluated once
    seen: dict[str, str] = {}
    for q, c in rows:
        if q in held:
            seen.setdefault(q, c)
    return Split(train, [EvalItem(prompt(q), CLASSES[c].strip()) for q, c in seen.items()])


def score(items, predicted):
    return scoring.labels(list(CLASSES.values()), [it.gold for it in items], predicted, macro_f1=True)


RECIPE = Recipe(name="trec", description="TREC question type (6 classes), question -> label", load=load,
                score=score, headline="accuracy", labels=tuple(CLASSES.values()), max_tokens=4)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
