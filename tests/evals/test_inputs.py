"""A run's input_messages: OpenAI's chat templates and item references, and our prompt template."""

import pytest

from app.evals import EvalSpecError, ItemError, parse_input_messages

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}, "history": {"type": "array"}}}


def test_chat_template_in_openai_shapes():
    t = parse_input_messages(
        {
            "type": "template",
            "template": [
                {"type": "message", "role": "developer", "content": {"type": "input_text", "text": "Classify."}},
                {"role": "user", "content": "Review: {{item.text}}"},
                {
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Sure"}, {"type": "input_text", "text": "."}],
                },
            ],
        },
        SCHEMA,
    )
    assert t.kind == "chat" and t.is_chat
    assert t.render({"text": "très bien"}) == [
        {"role": "system", "content": "Classify."},  # developer means system to our models
        {"role": "user", "content": "Review: très bien"},
        {"role": "assistant", "content": "Sure\n."},
    ]
    with pytest.raises(ItemError):
        t.render({})


def test_prompt_template_is_ours_for_completions():
    t = parse_input_messages({"type": "template", "template": "Review: {{item.text}}\nSentiment:"}, SCHEMA)
    assert t.kind == "prompt" and not t.is_chat
    assert t.render({"text": "good"}) == "Review: good\nSentiment:"


def test_item_reference():
    t = parse_input_messages({"type": "item_reference", "item_reference": "item.history"}, SCHEMA)
    assert t.render({"history": [{"role": "user", "content": "hi"}]}) == [{"role": "user", "content": "hi"}]
    for bad in ({"history": []}, {"history": [{"role": "robot", "content": "x"}]}, {}):
        with pytest.raises(ItemError):
            t.render(bad)


@pytest.mark.parametrize(
    "obj, param",
    [
        (None, "data_source.input_messages"),
        ({"type": "magic"}, "data_source.input_messages.type"),
        ({"type": "template", "template": []}, "data_source.input_messages.template"),
        (
            {"type": "template", "template": [{"role": "user", "content": "{{item.txt}}"}]},
            "data_source.input_messages.template[0].content",
        ),
        (
            {"type": "template", "template": [{"role": "user", "content": "{{sample.output_text}}"}]},
            "data_source.input_messages.template[0].content",
        ),
        (
            {"type": "template", "template": [{"role": "robot", "content": "x"}]},
            "data_source.input_messages.template[0].role",
        ),
        ({"type": "template", "template": [{"role": "user"}]}, "data_source.input_messages.template[0].content"),
        (
            {"type": "template", "template": [{"role": "user", "content": {"type": "input_image", "image_url": "x"}}]},
            "data_source.input_messages.template[0].content",
        ),
        ({"type": "template", "template": "{{item.nope}}"}, "data_source.input_messages.template"),
        ({"type": "item_reference", "item_reference": "item.nope"}, "data_source.input_messages.item_reference"),
        (
            {"type": "item_reference", "item_reference": "sample.output_text"},
            "data_source.input_messages.item_reference",
        ),
    ],
)
def test_bad_input_messages_name_the_field(obj, param):
    with pytest.raises(EvalSpecError) as e:
        parse_input_messages(obj, SCHEMA)
    assert e.value.param == param
