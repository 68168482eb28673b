"""Multi30k task 1, English -> German translation: `python -m recipes.multi30k --help`.

Data: multi30k/train.{en,de} (29,000 line-aligned pairs) to train, multi30k/val.{en,de} (1,014)
to evaluate.
Format: prompt "English: {en}\\nGerman:", completion " {de}".
Scored with sacrebleu: corpus BLEU and chrF (0-100) of the greedy translations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, main, task_file


def prompt(english: str) -> str:
    return f"English: {english}\nGerman:"


def read(root: Path, split: str) -> list[tuple[str, str]]:
    en = task_file(root, "multi30k", f"{split}.en").read_text(encoding="utf-8").splitlines()
    de = task_file(root, "multi30k", f"{split}.de").read_text(encoding="utf-8").splitlines()
    if len(en) != len(de):
        raise ValueError(f"multi30k/{split}.en has {len(en)} lines but {split}.de has {len(de)}")
    return [(e.strip(), d.strip()) for e, d in zip(en, de, strict=True) if e.strip() and d.strip()]


def load(root: Path) -> Split:
    train = [Example(prompt(e), " " + d) for e, d in read(root, "train")]
    items = [EvalItem(prompt(e), [d]) for e, d in read(root, "val")]
    return Split(train, items)


def score(items, outputs):
    return scoring.corpus_text(outputs, [it.gold for it in items], rouge_l=False)


RECIPE = Recipe(name="multi30k", description="Multi30k English -> German, sentence -> translation", load=load,
                score=score, headline="bleu", max_tokens=64)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
