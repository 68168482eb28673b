import pytest

from app.evals import EvalSpecError, ItemError, check_template, render, render_messages, render_value

SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "object", "properties": {"b": {"type": "string"}}}}}


def test_render_nested_and_sample():
    assert render("{{item.q}} {{ item.a.b }} {{sample.output_text}}", {"q": "é", "a": {"b": "x"}}, {"output_text": ""}) == "é x "


def test_missing_value_is_item_error():
    with pytest.raises(ItemError):
        render("{{item.q}}", {})


def test_unknown_field_is_spec_error_with_param():
    with pytest.raises(EvalSpecError) as e:
        check_template("{{item.nope}}", SCHEMA, "testing_criteria[0].input")
    assert e.value.param == "testing_criteria[0].input"


def test_render_value_raw_and_messages():
    assert render_value("{{item.t}}", {"t": ["B-PER", "O"]}) == ["B-PER", "O"]
    assert render_messages([{"role": "user", "content": "Q: {{item.q}}"}], {"q": "hi"}) == [{"role": "user", "content": "Q: hi"}]
