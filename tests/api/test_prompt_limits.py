"""The size checks that run before tokenizing (app/api/completions.py): prompt shapes, the refused
body's charge, chat content parts, and the character bound that no tokenized text can beat."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.completions import (
    RefusedPrompt,
    check_rows,
    check_text_length,
    max_token_chars,
    message_text,
    prompt_count,
    refused_charge,
)
from app.api.errors import APIError
from app.config import Settings


@pytest.fixture(scope="module")
def tok():
    from tests.conftest import _tiny_tokenizer

    return _tiny_tokenizer()


def test_prompt_count_and_charge_from_the_shape():
    assert [prompt_count(p) for p in ("x", [], ["a", "b"], [1, 2, 3], [[1], [2], [3]])] == [1, 0, 2, 1, 3]
    assert refused_charge("") == 1 and refused_charge("abc") == 3
    assert refused_charge(["a", "", "bc"]) == 4  # at least one per prompt
    assert refused_charge([1, 2, 3]) == 3 and refused_charge([[1, 2], []]) == 3


def test_check_rows():
    s = Settings(max_n=8, max_batch_size=8)
    check_rows(4, 2, s)
    with pytest.raises(RefusedPrompt, match="At most 8 choices"):
        check_rows(300_000, 1, s)


def test_check_text_length_charges_the_characters():
    check_text_length("a" * 30, 10, 3)
    with pytest.raises(RefusedPrompt) as e:
        check_text_length("a" * 31, 10, 3, param="input")
    assert e.value.charge == 31 and e.value.param == "input" and e.value.code == "context_length_exceeded"


def test_max_token_chars_is_the_longest_token(tok):
    strings = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert max_token_chars(tok) == max(len(t) for t in strings) == len("<|endoftext|>")
    assert max_token_chars(tok) is max_token_chars(tok)  # cached


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_no_text_encodes_to_fewer_tokens_than_the_bound(tok, text):
    """Why refusing len(text) > limit x max_token_chars is safe: such a text always has more
    than `limit` tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) * max_token_chars(tok) >= len(text)


def test_message_text():
    assert message_text(None, 0) == "" and message_text("hi", 0) == "hi"
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], 0) == "ab"
    with pytest.raises(APIError) as e:
        message_text([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}], 3)
    assert e.value.status_code == 400 and e.value.param == "messages[3].content[1]"
    with pytest.raises(APIError) as e:
        message_text([{"type": "text", "text": None}], 0)
    assert e.value.param == "messages[0].content[0].text"
