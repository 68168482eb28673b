"""Testing criteria: each a validated definition with `grade(item, sample) -> CriterionResult`.

OpenAI's graders, with their field names (`GraderStringCheck`, `EvalGraderTextSimilarity` of
OpenAI's OpenAPI spec):
- `string_check` {name, input, reference, operation: eq | ne | like | ilike}
- `text_similarity` {name, input, reference, evaluation_metric, pass_threshold}

Ours, for the tasks prefix tuning is for (documented as extensions in docs/EVALS.md):
- `text_similarity` with `evaluation_metric: "chrf"`
- `label` {name, labels, reference, normalize: mean | none}: classification by the scorer's
  label log-probabilities (needs the model: the caller injects `score_labels`)
- `span_f1` {name, input, reference, pass_threshold}: SQuAD exact match and token F1
- `entity_f1` {name, input, reference, format: bio | entities, pass_threshold}: span P/R/F1

`score_model`, `label_model`, `python` and `multi` are OpenAI graders this server refuses at
creation (EvalSpecError), never accepts and passes silently.

Every score lies in [0, 1]; `passed` is decided per criterion (string_check: the check holds;
text_similarity, span_f1, entity_f1: score >= pass_threshold; label: the top label is the
reference).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.evals import text_metrics
from app.evals.errors import EvalSpecError, ItemError
from app.evals.templates import check_template, render, render_value

# score_labels(prompt, labels) -> [(summed log-prob of the label after the prompt, its tokens)]
ScoreLabels = Callable[[Any, Sequence[str]], Sequence[Sequence[float]]]

Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


@dataclass
class Sample:
    """What the model did for one item: its text, and the prompt it was given (rendered text or
    messages, whatever the caller's `score_labels` understands)."""

    output_text: str = ""
    prompt: Any = None

    def namespace(self) -> dict[str, Any]:
        return {"output_text": self.output_text}


@dataclass
class CriterionResult:
    """One criterion on one item. `to_dict` is OpenAI's EvalRunOutputItemResult: the grader's
    intermediate data (predicted label, F1 parts, an item error) goes in its `sample` field,
    which the spec reserves for exactly that."""

    name: str
    type: str
    score: float
    passed: bool
    details: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        sample = dict(self.details or {})
        if self.error is not None:
            sample["error"] = self.error
        return {"name": self.name, "type": self.type, "score": self.score, "passed": self.passed,
                "sample": sample or None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CriterionResult:
        sample = dict(d.get("sample") or {})
        error = sample.pop("error", None)
        return cls(name=d["name"], type=d.get("type", ""), score=float(d["score"]), passed=bool(d["passed"]),
                   details=sample or None, error=error)


class _Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields holding templates, checked against the item_schema at creation.
    template_fields: ClassVar[tuple[str, ...]] = ("input", "reference")
    needs_sample: ClassVar[bool] = False

    name: Name

    def check(self, item_schema: Mapping[str, Any], include_sample: bool, param: str) -> None:
        for f in self.template_fields:
            check_template(getattr(self, f), item_schema, f"{param}.{f}", allow_sample=include_sample)
        if self.needs_sample and not include_sample:
            raise EvalSpecError(
                f"{param}: a {self.type} criterion grades the model, so data_source_config needs "
                "include_sample_schema: true", f"{param}.type")

    def grade(self, item: Mapping[str, Any], sample: Sample | None = None, *,
              score_labels: ScoreLabels | None = None) -> CriterionResult:
        raise NotImplementedError

    def _ns(self, sample: Sample | None) -> dict[str, Any] | None:
        return sample.namespace() if sample is not None else None

    def _result(self, score: float, passed: bool, details: dict[str, Any] | None = None) -> CriterionResult:
        return CriterionResult(self.name, self.type, float(score), bool(passed), details)


class StringCheck(_Criterion):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]

    def grade(self, item, sample=None, *, score_labels=None):
        text = render(self.input, item, self._ns(sample))
        ref = render(self.reference, item, self._ns(sample))
        # OpenAI's graders guide: like = the input contains the reference (case-sensitive), ilike
        # the same ignoring case. They are containment checks: % and _ are not wildcards.
        if self.operation == "eq":
            ok = text == ref
        elif self.operation == "ne":
            ok = text != ref
        elif self.operation == "like":
            ok = ref in text
        else:
            # casefold, not lower: "STRASSE" ilike "straße" holds, as Unicode caseless matching says.
            ok = ref.casefold() in text.casefold()
        return self._result(1.0 if ok else 0.0, ok)


class TextSimilarity(_Criterion):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal[
        "cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
        "rouge_5", "rouge_l", "chrf"]
    pass_threshold: Threshold

    def check(self, item_schema, include_sample, param):
        super().check(item_schema, include_sample, param)
        metric = self.evaluation_metric
        if metric in text_metrics.UNSUPPORTED_TEXT_METRICS:
            raise EvalSpecError(
                f"evaluation_metric {metric!r} is not supported: {text_metrics.UNSUPPORTED_TEXT_METRICS[metric]}",
                f"{param}.evaluation_metric")
        if metric == "meteor" and not text_metrics.wordnet_available():
            raise EvalSpecError(
                "evaluation_metric 'meteor' needs the WordNet database, which no package on the registry "
                "ships for offline use, and this server has none (an operator can enable it by putting "
                "NLTK's wordnet corpus under NLTK_DATA)", f"{param}.evaluation_metric")

    def grade(self, item, sample=None, *, score_labels=None):
        text = render(self.input, item, self._ns(sample))
        ref = render(self.reference, item, self._ns(sample))
        score = text_metrics.TEXT_METRIC_FNS[self.evaluation_metric](text, ref)
        return self._result(score, score >= self.pass_threshold)


class Label(_Criterion):
    """Ours. The scorer gives each label's summed log-probability as the continuation of the
    item's prompt and its token count; the top label is the prediction. `normalize: mean` (the
    default) ranks by log-prob per token, so a multi-token label is not penalised for its length;
    `none` ranks by the sum, as lm-evaluation-harness's `acc` does. Labels are scored exactly as
    written (a leading space included); the reference matches a label ignoring surrounding
    whitespace."""

    template_fields: ClassVar[tuple[str, ...]] = ("reference",)
    needs_sample: ClassVar[bool] = True

    type: Literal["label"]
    labels: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2, max_length=64)]
    reference: str = "{{item.label}}"
    normalize: Literal["mean", "none"] = "mean"

    def check(self, item_schema, include_sample, param):
        super().check(item_schema, include_sample, param)
        seen: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            key = label.strip()
            if not key:
                raise EvalSpecError("labels must not be blank", f"{param}.labels[{i}]")
            if key in seen:
                raise EvalSpecError(f"label {label!r} repeats labels[{seen[key]}] (ignoring surrounding "
                                    "whitespace)", f"{param}.labels[{i}]")
            seen[key] = i

    def grade(self, item, sample=None, *, score_labels=None):
        if score_labels is None:
            # A wiring mistake, not the item's fault: fail loudly rather than error every item.
            raise ValueError("the label criterion needs score_labels(prompt, labels)")
        ref_text = render(self.reference, item, self._ns(sample)).strip()
        by_text = {label.strip(): label for label in self.labels}
        if ref_text not in by_text:
            raise ItemError(f"reference {ref_text!r} is not one of the labels")
        raw = list(score_labels(sample.prompt if sample is not None else None, list(self.labels)))
        if len(raw) != len(self.labels):
            raise ValueError(f"score_labels returned {len(raw)} scores for {len(self.labels)} labels")
        values = []
        for label, (logprob_sum, n_tokens) in zip(self.labels, raw, strict=False):
            if n_tokens <= 0:
                raise ItemError(f"label {label!r} encodes to no tokens")
            values.append(logprob_sum / n_tokens if self.normalize == "mean" else float(logprob_sum))
        best = max(range(len(values)), key=values.__getitem__)  # first of equals wins
        top = max(values)
        z = sum(math.exp(v - top) for v in values)
        reference = by_text[ref_text]
        passed = self.labels[best] == reference
        return self._result(1.0 if passed else 0.0, passed, {
            "predicted": self.labels[best], "reference": reference,
            "scores": dict(zip(self.labels, values, strict=False)),
            "probabilities": {label: math.exp(v - top) / z for label, v in zip(self.labels, values, strict=False)},
        })


class SpanF1(_Criterion):
    """Ours. SQuAD's answer scoring: score = token F1 (max over the gold answers), and exact
    match beside it. The reference may name a list of acceptable answers (`{{item.answers}}`)."""

    type: Literal["span_f1"]
    input: str = "{{sample.output_text}}"
    reference: str
    pass_threshold: Threshold = 1.0

    def grade(self, item, sample=None, *, score_labels=None):
        prediction = render(self.input, item, self._ns(sample))
        gold = render_value(self.reference, item, self._ns(sample))
        golds = [gold] if isinstance(gold, str) else gold
        if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
            raise ItemError("span_f1 reference must be a string or a list of strings")
        em, f1 = text_metrics.squad_scores(prediction, golds)
        return self._result(f1, f1 >= self.pass_threshold, {"exact_match": em, "f1": f1})


def _as_tags(value: Any, what: str, *, lenient: bool) -> list[str] | None:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = text.split()
        else:
            value = text.split()
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    if lenient:
        return None
    raise ItemError(f"{what} must be a list of BIO tags or a whitespace-separated string of them")


def _as_entities(value: Any, what: str, *, lenient: bool) -> list[tuple[str, str]] | None:
    """Entities as (type, text): {"type": t, "text": s} (or "label" for type), [t, s], or a bare
    string (untyped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    out = []
    if isinstance(value, list):
        for e in value:
            if isinstance(e, str):
                out.append(("", e))
            elif isinstance(e, Mapping) and isinstance(e.get("text"), str):
                out.append((str(e.get("type", e.get("label", ""))), e["text"]))
            elif isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e):
                out.append((e[0], e[1]))
            else:
                break
        else:
            return out
    if lenient:
        return None
    raise ItemError(f"{what} must be a list of entities ({{type, text}}, [type, text] or text)")


class EntityF1(_Criterion):
    """Ours. Span-level precision, recall and F1 of the predicted entities against the gold ones:
    `format: bio` reads BIO/IOB tag sequences into spans with seqeval (its default, conlleval-
    compatible mode); `format: entities` compares lists of (type, text) entities as multisets.
    The score is the item's F1; the run reports micro-averaged P/R/F1. A model output that cannot
    be read as tags/entities counts as predicting none."""

    type: Literal["entity_f1"]
    input: str = "{{sample.output_text}}"
    reference: str
    format: Literal["bio", "entities"] = "bio"
    pass_threshold: Threshold = 1.0

    def grade(self, item, sample=None, *, score_labels=None):
        ns = self._ns(sample)
        details: dict[str, Any] = {}
        if self.format == "bio":
            gold_tags = _as_tags(render_value(self.reference, item, ns), "entity_f1 reference", lenient=False)
            pred_tags = _as_tags(render_value(self.input, item, ns), "output", lenient=True) or []
            if len(pred_tags) != len(gold_tags):
                # Tags align with the reference's tokens: a short answer is padded with O, a long one
                # cut, so the spans it does get right still count.
                details["length_mismatch"] = [len(pred_tags), len(gold_tags)]
                pred_tags = (pred_tags + ["O"] * len(gold_tags))[:len(gold_tags)]
            gold = Counter(text_metrics.bio_entities(gold_tags))
            pred = Counter(text_metrics.bio_entities(pred_tags))
        else:
            gold_list = _as_entities(render_value(self.reference, item, ns), "entity_f1 reference", lenient=False)
            pred_list = _as_entities(render_value(self.input, item, ns), "output", lenient=True)
            if pred_list is None:
                details["unparseable"] = True
                pred_list = []
            gold = Counter((t, s.strip()) for t, s in gold_list)
            pred = Counter((t, s.strip()) for t, s in pred_list)
        correct = sum((gold & pred).values())
        n_pred, n_gold = sum(pred.values()), sum(gold.values())
        p, r, f = text_metrics.prf(correct, n_pred, n_gold)
        details.update(precision=p, recall=r, f1=f, correct=correct, predicted=n_pred, gold=n_gold)
        return self._result(f, f >= self.pass_threshold, details)


Criterion = StringCheck | TextSimilarity | Label | SpanF1 | EntityF1

CRITERIA: dict[str, type[_Criterion]] = {
    "string_check": StringCheck,
    "text_similarity": TextSimilarity,
    "label": Label,
    "span_f1": SpanF1,
    "entity_f1": EntityF1,
}

# OpenAI's graders that need what this server does not run: say so, never pass silently.
REFUSED: dict[str, str] = {
    "score_model": "score_model graders need a judge model, which this server does not run; use "
                   "string_check, text_similarity or our label/span_f1/entity_f1 criteria",
    "label_model": "label_model graders need a judge model, which this server does not run; our 'label' "
                   "criterion classifies with the evaluated model's own label probabilities",
    "python": "python graders would run user code on the server, which it does not do",
    "multi": "multi graders are not supported",
}

