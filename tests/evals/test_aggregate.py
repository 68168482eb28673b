"""Run totals in OpenAI's EvalRun shapes (result_counts, per_testing_criteria_results), and our
per-criterion metrics: label accuracy / macro-F1 / confusion matrix, span and entity F1."""

import json

import pytest

from app.evals import (
    ItemOutcome,
    Sample,
    grade_item,
    label_metrics,
    summarize_run,
    validate_eval,
)

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "label": {"type": "string"},
                                            "tags": {"type": "array"}}}
DSC = {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}


def test_counts_per_item_and_per_criterion():
    spec = validate_eval(DSC, [
        {"type": "string_check", "name": "contains", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}", "operation": "ilike"},
        {"type": "text_similarity", "name": "fuzzy", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.9},
    ])
    outcomes = [
        spec.grade({"answer": "Paris"}, Sample("Paris")),                 # pass, pass -> pass
        spec.grade({"answer": "Paris"}, Sample("It is Paris")),           # pass, fail -> fail
        spec.grade({"answer": "Rome"}, Sample("Paris")),                  # fail, fail -> fail
        spec.grade({}, Sample("Paris")),                                  # missing answer -> error
        ItemOutcome.errored("the model call failed"),                     # no sample -> error
    ]
    assert [o.status for o in outcomes] == ["pass", "fail", "fail", "error", "error"]
    assert outcomes[3].error.startswith("contains: {{item.answer}}")
    assert outcomes[3].results[0].to_dict()["sample"]["error"]  # the reason rides on the result
    # Outcomes come back from storage as JSON, and as a stream.
    stored = (json.loads(json.dumps(o.to_dict())) for o in outcomes)
    s = summarize_run(spec.criteria, stored).to_dict()
    assert s["result_counts"] == {"total": 5, "passed": 1, "failed": 2, "errored": 2}
    assert s["per_testing_criteria_results"] == [
        {"testing_criteria": "contains", "passed": 2, "failed": 1},
        {"testing_criteria": "fuzzy", "passed": 1, "failed": 2},
    ]
    fuzzy = s["per_testing_criteria_metrics"][1]
    assert fuzzy["graded"] == 3 and fuzzy["mean_score"] == pytest.approx((1.0 + 10 / 16 + 0.0) / 3)


def test_label_accuracy_macro_f1_and_confusion_matrix():
    # y_true a a b b c / y_pred a b b b a: accuracy 3/5; F1 a = 1/2, b = 4/5, c = 0 -> macro 13/30.
    out = label_metrics(["a", "b", "c"], ["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"])
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["macro_f1"] == pytest.approx(13 / 30)
    assert out["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]]}
    # A label nobody used (reference or prediction) does not drag macro-F1 down.
    assert label_metrics(["a", "b", "z"], ["a", "b"], ["a", "b"])["macro_f1"] == 1.0
    assert label_metrics(["a", "b"], [], [])["accuracy"] is None


def test_label_criterion_over_a_run():
    spec = validate_eval(DSC, [{"type": "label", "name": "sentiment", "labels": [" positive", " negative"]}])
    # The scorer prefers " positive" when the prompt says "good".
    def score_labels(prompt, labels):
        return [(-0.1, 1) if ("good" in prompt) == (label == " positive") else (-2.0, 1) for label in labels]

    rows = [("good film", "positive"), ("good, not", "negative"), ("bad film", "negative"), ("meh", "neutral")]
    outcomes = [spec.grade({"label": gold}, Sample("", prompt=text), score_labels=score_labels) for text, gold in rows]
    s = summarize_run(spec.criteria, outcomes)
    assert s.result_counts == {"total": 4, "passed": 2, "failed": 1, "errored": 1}
    m = s.per_testing_criteria_metrics[0]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == {"labels": [" positive", " negative"], "matrix": [[1, 0], [1, 1]]}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_span_and_entity_metrics_over_a_run():
    from seqeval.metrics import f1_score, precision_score, recall_score

    spec = validate_eval(DSC, [
        {"type": "span_f1", "name": "qa", "reference": "{{item.answer}}"},
        {"type": "entity_f1", "name": "ner", "reference": "{{item.tags}}"},
    ])
    rows = [
        ("Denver Broncos", ["B-ORG", "I-ORG"], "B-ORG I-ORG"),
        ("Carolina Panthers", ["B-ORG", "I-ORG", "O", "B-LOC"], "B-ORG O O B-LOC"),
        ("Santa Clara", ["B-LOC", "I-LOC"], "B-PER I-PER"),
    ]
    outcomes = [grade_item(spec.criteria, {"answer": a, "tags": t}, Sample(out)) for a, t, out in rows]
    m = summarize_run(spec.criteria, outcomes).per_testing_criteria_metrics
    qa, ent = m
    # Outputs are tag strings, so against the answers exact match is 0 everywhere.
    assert qa["exact_match"] == 0.0 and qa["f1"] == 0.0
    # Run-level entity scores are micro averages over all items, which is what seqeval computes.
    gold = [t for _, t, _ in rows]
    pred = [out.split() for _, _, out in rows]
    assert ent["precision"] == pytest.approx(precision_score(gold, pred))
    assert ent["recall"] == pytest.approx(recall_score(gold, pred))
    assert ent["f1"] == pytest.approx(f1_score(gold, pred))
    assert (ent["correct"], ent["predicted"], ent["gold"]) == (2, 4, 4)


def test_one_entry_per_criterion_even_when_nothing_graded():
    spec = validate_eval(DSC, [{"type": "string_check", "name": "a", "input": "{{sample.output_text}}",
                                "reference": "x", "operation": "eq"}])
    s = summarize_run(spec.criteria, [ItemOutcome.errored("boom")])
    assert s.result_counts == {"total": 1, "passed": 0, "failed": 0, "errored": 1}
    assert s.per_testing_criteria_results == [{"testing_criteria": "a", "passed": 0, "failed": 0}]
    assert s.per_testing_criteria_metrics[0]["mean_score"] is None
