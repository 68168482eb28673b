"""Eval definitions: OpenAI's CreateEvalRequest shapes, every bad one an EvalSpecError whose
`param` names the field as OpenAI's error `param` does; item rows checked with jsonschema and
reported by line number."""

import json

import pytest

from app.evals import (
    EvalSpecError,
    content_rows,
    jsonl_rows,
    text_metrics,
    validate_eval,
    validate_jsonl,
    validate_rows,
)

SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"},
                                            "label": {"type": "string"}},
          "required": ["question", "answer"]}
DSC = {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}
STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}
SIMILARITY = {"type": "text_similarity", "name": "bleu", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "evaluation_metric": "bleu", "pass_threshold": 0.5}


def spec_error(dsc, criteria) -> EvalSpecError:
    with pytest.raises(EvalSpecError) as e:
        validate_eval(dsc, criteria)
    return e.value


def test_openai_shapes_validate_and_round_trip():
    criteria = [STRING_CHECK, SIMILARITY,
                {"type": "label", "name": "cls", "labels": [" yes", " no"]},
                {"type": "span_f1", "name": "qa", "reference": "{{item.answer}}"},
                {"type": "entity_f1", "name": "ner", "reference": "{{item.label}}", "format": "entities"}]
    spec = validate_eval(DSC, criteria)
    assert [c.name for c in spec.criteria] == ["exact", "bleu", "cls", "qa", "ner"]
    stored = spec.to_dict()
    assert stored["testing_criteria"][2]["normalize"] == "mean"  # defaults are filled in
    assert stored["testing_criteria"][2]["reference"] == "{{item.label}}"
    again = validate_eval(**json.loads(json.dumps(stored)))
    assert again == spec
    assert spec.response_data_source_config() == {
        "type": "custom",
        "schema": {"type": "object", "properties": {"item": SCHEMA, "sample": {
            "type": "object", "properties": {"output_text": {"type": "string"}}, "required": ["output_text"]}},
            "required": ["item", "sample"]}}


@pytest.mark.parametrize("patch, param, words", [
    ({"operation": "like%"}, "testing_criteria[1].operation", "eq"),
    ({"operation": None}, "testing_criteria[1].operation", "Invalid"),
    ({"name": ""}, "testing_criteria[1].name", "Invalid"),
    ({"extra_field": 1}, "testing_criteria[1].extra_field", "Unknown parameter"),
    ({"reference": "{{item.anwser}}"}, "testing_criteria[1].reference", "item.anwser"),
    ({"input": "{{sample.output_json}}"}, "testing_criteria[1].input", "output_text"),
    ({"type": "fancy"}, "testing_criteria[1].type", "unknown criterion type"),
    ({"type": None}, "testing_criteria[1].type", "Missing required parameter"),
    ({"type": ["string_check"]}, "testing_criteria[1].type", "unknown criterion type"),
])
def test_bad_string_check_names_the_field(patch, param, words):
    e = spec_error(DSC, [SIMILARITY, {**STRING_CHECK, **patch}])
    assert e.param == param
    assert words in e.message


def test_missing_fields_are_named():
    c = dict(STRING_CHECK)
    del c["operation"]
    assert spec_error(DSC, [c]).param == "testing_criteria[0].operation"
    c = dict(SIMILARITY)
    del c["pass_threshold"]  # EvalGraderTextSimilarity requires it
    assert spec_error(DSC, [c]).param == "testing_criteria[0].pass_threshold"
    assert spec_error(DSC, [{"name": "x"}]).param == "testing_criteria[0].type"
    assert spec_error(DSC, ["string_check"]).param == "testing_criteria[0]"


@pytest.mark.parametrize("kind", ["score_model", "label_model", "python", "multi"])
def test_model_and_code_graders_are_refused_not_passed(kind):
    e = spec_error(DSC, [STRING_CHECK, {"type": kind, "name": "g", "model": "m", "input": [], "source": ""}])
    assert e.param == "testing_criteria[1].type"
    assert kind in e.message


def test_text_similarity_metric_rules(monkeypatch):
    assert (
        spec_error(DSC, [{**SIMILARITY, "evaluation_metric": "cosine"}]).param
        == "testing_criteria[0].evaluation_metric"
    )
    assert (
        spec_error(DSC, [{**SIMILARITY, "evaluation_metric": "bertscore"}]).param
        == "testing_criteria[0].evaluation_metric"
    )
    for bad in (1.5, -0.1, float("nan")):
        assert spec_error(DSC, [{**SIMILARITY, "pass_threshold": bad}]).param == "testing_criteria[0].pass_threshold"
    monkeypatch.setattr(text_metrics, "wordnet_available", lambda: False)
    e = spec_error(DSC, [{**SIMILARITY, "evaluation_metric": "meteor"}])
    assert e.param == "testing_criteria[0].evaluation_metric" and "WordNet" in e.message
    for m in ("fuzzy_match", "gleu", "rouge_1", "rouge_5", "rouge_l", "chrf"):
        validate_eval(DSC, [{**SIMILARITY, "evaluation_metric": m}])


def test_label_rules():
    label = {"type": "label", "name": "cls", "labels": [" yes", " no"]}
    no_sample = {**DSC, "include_sample_schema": False}
    assert "include_sample_schema" in spec_error(no_sample, [label]).message
    assert spec_error(DSC, [{**label, "labels": ["yes", " yes "]}]).param == "testing_criteria[0].labels[1]"
    assert spec_error(DSC, [{**label, "labels": ["yes"]}]).param == "testing_criteria[0].labels"
    assert spec_error(DSC, [{**label, "labels": ["yes", "  "]}]).param == "testing_criteria[0].labels[1]"
    assert spec_error(DSC, [{**label, "normalize": "softmax"}]).param == "testing_criteria[0].normalize"
    assert spec_error(DSC, [{**label, "reference": "{{item.gold}}"}]).param == "testing_criteria[0].reference"


def test_sample_namespace_needs_include_sample_schema():
    e = spec_error({**DSC, "include_sample_schema": False}, [STRING_CHECK])
    assert e.param == "testing_criteria[0].input"
    # Without a sample, an eval can still compare item fields with each other.
    validate_eval(
        {**DSC, "include_sample_schema": False}, [{**STRING_CHECK, "input": "{{item.question}}", "operation": "ne"}]
    )


def test_eval_level_errors():
    assert spec_error(DSC, []).param == "testing_criteria"
    assert spec_error(DSC, [STRING_CHECK, STRING_CHECK]).param == "testing_criteria[1].name"
    assert spec_error(None, [STRING_CHECK]).param == "data_source_config"
    assert spec_error({**DSC, "type": "logs"}, [STRING_CHECK]).param == "data_source_config.type"
    assert spec_error({"type": "custom"}, [STRING_CHECK]).param == "data_source_config.item_schema"
    assert (
        spec_error({**DSC, "include_sample_schema": "yes"}, [STRING_CHECK]).param
        == "data_source_config.include_sample_schema"
    )
    assert spec_error({**DSC, "schema": {}}, [STRING_CHECK]).param == "data_source_config.schema"
    e = spec_error({**DSC, "item_schema": {"type": "object", "properties": {"q": {"type": "strng"}}}}, [STRING_CHECK])
    assert e.param.startswith("data_source_config.item_schema") and "not a valid JSON schema" in e.message
    assert (
        spec_error({**DSC, "item_schema": {"type": "string"}}, [STRING_CHECK]).param
        == "data_source_config.item_schema.type"
    )
    assert spec_error({**DSC, "item_schema": []}, [STRING_CHECK]).param == "data_source_config.item_schema"


def test_jsonl_rows_report_line_numbers():
    lines = [
        json.dumps({"item": {"question": "q1", "answer": "a1"}}),
        "",  # blank lines are skipped but counted
        json.dumps({"item": {"question": "q2"}}),  # line 3: missing answer
        "{not json",  # line 4
        json.dumps({"question": "q5", "answer": "a5"}),  # line 5: no {"item": ...} wrapper
        json.dumps({"item": {"question": 6, "answer": "a6"}}).encode(),  # line 6: bytes, wrong type
        b"\xff\xfe",  # line 7
    ]
    with pytest.raises(EvalSpecError) as e:
        validate_jsonl(lines, SCHEMA, param="data_source.source.id")
    msg = e.value.message
    assert e.value.param == "data_source.source.id"
    assert msg.startswith("5 rows do not match")
    for part in (
        "line 3: item: 'answer' is a required property",
        "line 4: not JSON",
        "line 5: expected an object",
        "line 6: item.question: 6 is not of type 'string'",
        "line 7: not UTF-8",
    ):
        assert part in msg
    assert "line 1" not in msg


def test_rows_error_list_is_capped_and_good_rows_counted():
    bad = [json.dumps({"item": {}})] * 15
    with pytest.raises(EvalSpecError, match=r"15 rows .*and 5 more"):
        validate_jsonl(bad, SCHEMA, max_errors=10)
    good = (json.dumps({"item": {"question": f"q{i}", "answer": "a"}}) for i in range(1000))  # a stream
    assert validate_jsonl(good, SCHEMA) == 1000
    with pytest.raises(EvalSpecError, match="no rows"):
        validate_jsonl(["", "  "], SCHEMA)


def test_file_content_rows():
    content = [{"item": {"question": "q", "answer": "a"}}, {"item": {"question": "q"}}]
    with pytest.raises(EvalSpecError, match="line 2: item: 'answer' is a required property"):
        validate_rows(content_rows(content), SCHEMA, param="data_source.source.content")
    with pytest.raises(EvalSpecError) as e:
        list(content_rows({"item": {}}))
    assert e.value.param == "data_source.source.content"
    assert [n for n, _ in jsonl_rows(["", "{}"])] == [2]
