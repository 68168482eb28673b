"""Templates: `{{item.a.b}}` / `{{sample.output_text}}` checked against the item_schema at
creation (EvalSpecError naming the param) and rendered per item (ItemError for a missing value)."""

import pytest

from app.evals import (
    EvalSpecError,
    ItemError,
    check_template,
    references,
    render,
    render_messages,
    render_value,
)

SCHEMA = {
    "type": "object",
    "properties": {"q": {"type": "string"}, "a": {"type": "object", "properties": {"b": {"type": "string"}}}},
}


def test_render_nested_and_sample():
    assert (
        render("{{item.q}} {{ item.a.b }} {{sample.output_text}}", {"q": "é", "a": {"b": "x"}}, {"output_text": ""})
        == "é x "
    )


def test_render_non_strings_as_json_and_unicode_verbatim():
    item = {"n": 3, "f": 0.5, "t": True, "l": ["a", "ü"], "s": "日本語 🎉"}
    assert render("{{item.n}}|{{item.f}}|{{item.t}}|{{item.l}}|{{item.s}}", item) == '3|0.5|true|["a", "ü"]|日本語 🎉'


def test_missing_value_is_item_error():
    with pytest.raises(ItemError):
        render("{{item.q}}", {})
    with pytest.raises(ItemError, match="item.a.b"):
        render("{{item.a.b}}", {"a": {}})
    with pytest.raises(ItemError, match="null"):
        render("{{item.q}}", {"q": None})  # never rendered as "None" or "" that would silently grade


def test_unknown_field_is_spec_error_with_param():
    with pytest.raises(EvalSpecError) as e:
        check_template("{{item.nope}}", SCHEMA, "testing_criteria[0].input")
    assert e.value.param == "testing_criteria[0].input"
    with pytest.raises(EvalSpecError):
        check_template("{{item.a.c}}", SCHEMA, "p")  # nested: a declares b only
    check_template("{{item.a.b}} and {{item.q}}", SCHEMA, "p")


def test_malformed_or_foreign_placeholders_are_refused():
    for bad in ("{{ item }}", "{{item.}}", "{{foo.bar}}", "{{ item.q | upper }}"):
        with pytest.raises(EvalSpecError):
            check_template(bad, SCHEMA, "p")


def test_sample_namespace_rules():
    check_template("{{sample.output_text}}", SCHEMA, "p", allow_sample=True)
    with pytest.raises(EvalSpecError, match="include_sample_schema"):
        check_template("{{sample.output_text}}", SCHEMA, "p", allow_sample=False)
    with pytest.raises(EvalSpecError, match="output_text"):
        check_template("{{sample.output_json}}", SCHEMA, "p")


def test_schema_walk_follows_refs_combinators_and_open_levels():
    schema = {
        "type": "object",
        "$defs": {"ctx": {"type": "object", "properties": {"title": {"type": "string"}}}},
        "properties": {
            "ctx": {"$ref": "#/$defs/ctx"},
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {"x": {}}, "additionalProperties": True},
        },
        "allOf": [{"properties": {"extra": {"type": "string"}}}],
        "patternProperties": {"^meta_": {"type": "string"}},
    }
    for ok in (
        "{{item.ctx.title}}",
        "{{item.free.anything.deep}}",
        "{{item.open.y}}",
        "{{item.extra}}",
        "{{item.meta_source}}",
    ):
        check_template(ok, schema, "p")
    for bad in ("{{item.ctx.body}}", "{{item.missing}}"):
        with pytest.raises(EvalSpecError):
            check_template(bad, schema, "p")
    # A schema that declares no fields at all cannot prove one absent.
    check_template("{{item.whatever}}", {"type": "object"}, "p")


def test_render_value_raw_and_messages():
    assert render_value("{{item.t}}", {"t": ["B-PER", "O"]}) == ["B-PER", "O"]
    assert render_value(" {{item.t}} ", {"t": ["x"]}) == ["x"]
    assert render_value("tags: {{item.t}}", {"t": ["x"]}) == 'tags: ["x"]'
    assert render_messages([{"role": "user", "content": "Q: {{item.q}}"}], {"q": "hi"}) == [
        {"role": "user", "content": "Q: hi"}
    ]
    assert references("{{item.a.b}} {{sample.output_text}}") == [["item", "a", "b"], ["sample", "output_text"]]
