"""QA-SRL semantic role labelling as question answering: `python -m recipes.qasrl --help`.

Data: the QA-SRL gold standard (Roit et al. 2020), development files only:
qasrl/gold/{wikinews,wikipedia}.dev.gold.csv (one row per question and its answer spans) joined
on `qasrl_id` with qasrl/sentences/{...}.dev.full.csv (the tokenised sentence). It has no
training split, so the sentences are split: a seeded 20% of the sentences that have questions is
held out for evaluation, and every question about a sentence stays on its sentence's side.
Format: prompt "Sentence: {sentence}\\nVerb: {verb}\\nQuestion: {question}\\nAnswer:",
completion " {first answer span}". A question's acceptable answers are all its spans (an
annotator may give several, joined by `~!~`; a question asked twice pools them). Scored as
QA-SRL scores answers: token F1 and exact match against the best-matching span (SQuAD
normalisation), averaged over questions.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, hold_out, main, task_file

DOMAINS = ("wikinews", "wikipedia")
HOLD_OUT = 0.20
SPAN_SEP = "~!~"


def prompt(sentence: str, verb: str, question: str) -> str:
    return f"Sentence: {sentence}\nVerb: {verb}\nQuestion: {question}\nAnswer:"


def read(root: Path) -> dict[tuple[str, str, str], dict]:
    """{(qasrl_id, verb_idx, question): {sentence, verb, answers}} over both domains, in file order."""
    questions: dict[tuple[str, str, str], dict] = {}
    for domain in DOMAINS:
        with open(task_file(root, "qasrl", "sentences", f"{domain}.dev.full.csv"), encoding="utf-8", newline="") as f:
            sentences = {r["qasrl_id"]: r["sentence"] for r in csv.DictReader(f)}
        with open(task_file(root, "qasrl", "gold", f"{domain}.dev.gold.csv"), encoding="utf-8", newline="") as f:
            for r in csv.DictReader(f):
                if r["qasrl_id"] not in sentences:
                    raise ValueError(f"qasrl/gold/{domain}.dev.gold.csv: {r['qasrl_id']} has no sentence")
                key = (r["qasrl_id"], r["verb_idx"], r["question"])
                q = questions.setdefault(key, {"sentence": sentences[r["qasrl_id"]], "verb": r["verb"],
                                               "answers": []})
                for span in r["answer"].split(SPAN_SEP):
                    if span.strip() and span.strip() not in q["answers"]:
                        q["answers"].append(span.strip())
    return {k: q for k, q in questions.items() if q["answers"]}


def load(root: Path) -> Split:
    questions = read(root)
    held = hold_out([sid for sid, _, _ in questions], HOLD_OUT)
    train, items = [], []
    for (sid, _, question), q in questions.items():
        p = prompt(q["sentence"], q["verb"], question)
        if sid in held:
            items.append(EvalItem(p, {"sentence_id": sid, "answers": q["answers"]}))
        else:
            train.append(Example(p, " " + q["answers"][0]))
    return Split(train, items)


def score(items, outputs):
    return scoring.spans(outputs, [it.gold["answers"] for it in items])


RECIPE = Recipe(name="qasrl", description="QA-SRL, sentence + predicate + role question -> answer span",
                load=load, score=score, headline="f1", max_tokens=24)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
