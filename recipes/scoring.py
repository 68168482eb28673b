"""Scores of a recipe's outputs, from the metric functions of `app.evals` (the same code the Evals
API grades with) and, for corpus-level BLEU and chrF, from sacrebleu itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from app.evals import label_metrics
from app.evals import text_metrics as m


def labels(names: Sequence[str], gold: Sequence[str], predicted: Sequence[str], *, macro_f1: bool) -> dict[str, float]:
    """Accuracy (and macro-F1) with scikit-learn, through app.evals' label metrics."""
    got = label_metrics([n.strip() for n in names], list(gold), list(predicted))
    out = {"accuracy": got["accuracy"]}
    if macro_f1:
        out["macro_f1"] = got["macro_f1"]
    return out


def spans(outputs: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD-style token F1 and exact match, each the max over the acceptable answers, averaged
    over the questions (how QA-SRL scores an answer against its gold spans)."""
    em = f1 = 0.0
    for out, golds in zip(outputs, answers, strict=True):
        e, f = m.squad_scores(out, list(golds))
        em, f1 = em + e, f1 + f
    n = max(1, len(outputs))
    return {"f1": f1 / n, "exact_match": em / n}


def corpus_text(outputs: Sequence[str], references: Sequence[Sequence[str]], *, rouge_l: bool) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100, every output against all its references, as
    translation and E2E report them); ROUGE-L F (0-1) per output against its best reference, mean."""
    import sacrebleu

    width = max(len(r) for r in references)
    # sacrebleu takes reference streams; an output with fewer references pads with None
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    out = {"bleu": sacrebleu.corpus_bleu(list(outputs), streams).score,
           "chrf": sacrebleu.corpus_chrf(list(outputs), streams).score}
    if rouge_l:
        score = m.rouge("rougeL")
        best = [max(score(o, r) for r in refs) for o, refs in zip(outputs, references, strict=True)]
        out["rouge_l"] = sum(best) / max(1, len(best))
    return out


Entities = Sequence[Sequence[tuple[str, str]]]


def entities(predicted: Entities, gold: Entities) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1: an entity counts when its type and its text
    both match (a multiset per sentence), summed over sentences as seqeval's micro average does."""
    correct = n_pred = n_gold = 0
    for p, g in zip(predicted, gold, strict=True):
        cp, cg = Counter(map(tuple, p)), Counter(map(tuple, g))
        correct += sum((cp & cg).values())
        n_pred += sum(cp.values())
        n_gold += sum(cg.values())
    p, r, f = m.prf(correct, n_pred, n_gold)
    return {"f1": f, "precision": p, "recall": r}
