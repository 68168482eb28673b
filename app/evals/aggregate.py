"""Grading one item with every criterion, and a run's totals, in the shapes of OpenAI's EvalRun.

- An item `pass`es when every criterion passed, `fail`s when one failed, and is `error` when it
  could not be graded (its sample failed, or a criterion raised ItemError for it); an errored
  item keeps the results of the criteria that did grade it.
- `result_counts {total, passed, failed, errored}` counts items.
- `per_testing_criteria_results [{testing_criteria, passed, failed}]` has exactly one entry per
  criterion, in the eval's order, counting the items that criterion graded.
- Ours, beside them: `per_testing_criteria_metrics`, one entry per criterion with its mean
  score, and for `label` accuracy, macro-F1 and the confusion matrix (scikit-learn), for
  `span_f1` mean exact match and F1, for `entity_f1` micro-averaged precision, recall and F1.

`summarize_run` takes outcomes as an iterable (from the store, page by page) and keeps only
what the metrics need: per-criterion sums and, for label criteria, the label pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.evals import text_metrics
from app.evals.criteria import Criterion, CriterionResult, Label, Sample, ScoreLabels
from app.evals.errors import ItemError


@dataclass
class ItemOutcome:
    status: str  # "pass" | "fail" | "error"
    results: list[CriterionResult] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def errored(cls, message: str) -> ItemOutcome:
        """An item whose sample could not be produced (the model call failed for that row)."""
        return cls("error", [], message)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "results": [r.to_dict() for r in self.results], "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ItemOutcome:
        return cls(d["status"], [CriterionResult.from_dict(r) for r in d.get("results") or ()], d.get("error"))


def grade_item(criteria: Sequence[Criterion], item: Mapping[str, Any], sample: Sample | None = None, *,
               score_labels: ScoreLabels | None = None) -> ItemOutcome:
    results: list[CriterionResult] = []
    errors: list[str] = []
    for c in criteria:
        try:
            results.append(c.grade(item, sample, score_labels=score_labels))
        except ItemError as e:
            errors.append(f"{c.name}: {e}")
            results.append(CriterionResult(c.name, c.type, 0.0, False, None, str(e)))
    if errors:
        return ItemOutcome("error", results, "; ".join(errors))
    return ItemOutcome("pass" if all(r.passed for r in results) else "fail", results)


@dataclass
class RunSummary:
    result_counts: dict[str, int]
    per_testing_criteria_results: list[dict[str, Any]]
    per_testing_criteria_metrics: list[dict[str, Any]]  # ours

    def to_dict(self) -> dict[str, Any]:
        return {"result_counts": self.result_counts,
                "per_testing_criteria_results": self.per_testing_criteria_results,
                "per_testing_criteria_metrics": self.per_testing_criteria_metrics}


def label_metrics(labels: Sequence[str], y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix (rows: reference, columns: predicted, in the
    criterion's label order) with scikit-learn. Macro-F1 averages over the labels that occur as a
    reference or a prediction (scikit-learn's default), so a label nobody used does not count 0."""
    if not y_true:
        return {"accuracy": None, "macro_f1": None, "confusion_matrix": {"labels": list(labels), "matrix": None}}
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "confusion_matrix": {"labels": list(labels),
                             "matrix": confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()},
    }


class _Acc:
    def __init__(self, c: Criterion):
        self.c = c
        self.passed = self.failed = self.graded = 0
        self.score_sum = 0.0
        self.y_true: list[str] = []
        self.y_pred: list[str] = []
        self.em_sum = self.f1_sum = 0.0
        self.correct = self.n_pred = self.n_gold = 0

    def add(self, r: CriterionResult) -> None:
        if r.error is not None:
            return
        self.graded += 1
        self.score_sum += r.score
        if r.passed:
            self.passed += 1
        else:
            self.failed += 1
        d = r.details or {}
        if self.c.type == "label":
            self.y_true.append(d["reference"])
            self.y_pred.append(d["predicted"])
        elif self.c.type == "span_f1":
            self.em_sum += d["exact_match"]
            self.f1_sum += d["f1"]
        elif self.c.type == "entity_f1":
            self.correct += d["correct"]
            self.n_pred += d["predicted"]
            self.n_gold += d["gold"]

    def metrics(self) -> dict[str, Any]:
        n = self.graded
        out: dict[str, Any] = {"testing_criteria": self.c.name, "type": self.c.type, "graded": n,
                               "mean_score": self.score_sum / n if n else None}
        if isinstance(self.c, Label):
            out.update(label_metrics(self.c.labels, self.y_true, self.y_pred))
        elif self.c.type == "span_f1":
            out.update(exact_match=self.em_sum / n if n else None, f1=self.f1_sum / n if n else None)
        elif self.c.type == "entity_f1":
            p, r, f = text_metrics.prf(self.correct, self.n_pred, self.n_gold) if n else (None, None, None)
            out.update(precision=p, recall=r, f1=f, correct=self.correct, predicted=self.n_pred, gold=self.n_gold)
        return out


def summarize_run(criteria: Sequence[Criterion], outcomes: Iterable[ItemOutcome | Mapping[str, Any]]) -> RunSummary:
    accs = {c.name: _Acc(c) for c in criteria}
    counts = {"total": 0, "passed": 0, "failed": 0, "errored": 0}
    for o in outcomes:
        if isinstance(o, Mapping):
            o = ItemOutcome.from_dict(o)
        counts["total"] += 1
        counts[{"pass": "passed", "fail": "failed", "error": "errored"}[o.status]] += 1
        for r in o.results:
            if r.name in accs:
                accs[r.name].add(r)
    return RunSummary(
        counts,
        [{"testing_criteria": a.c.name, "passed": a.passed, "failed": a.failed} for a in accs.values()],
        [a.metrics() for a in accs.values()],
    )
