"""The dataset validator: every reason, line numbers, caps, counts; random bytes never crash it."""

from __future__ import annotations

import io
import json
import random

import pytest

from app.files.validation import detect_format, estimate_tokens, iter_lines, validate_dataset


def run(text: bytes | str, purpose="fine-tune", fmt="jsonl", **kw):
    data = text.encode() if isinstance(text, str) else text
    return validate_dataset(io.BytesIO(data), purpose, fmt, **kw)


def jl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def test_valid_prompt_completion_counts_rows_and_tokens():
    res = run(jl({"prompt": "abcd", "completion": "efgh"}, {"prompt": "x", "completion": " y"}))
    assert res.ok and res.rows == 2 and res.errors == [] and res.details is None
    assert res.tokens == estimate_tokens("abcdefgh") + estimate_tokens("x y")


def test_valid_messages():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    res = run(jl({"messages": msgs}))
    assert res.ok and res.rows == 1


def test_custom_token_counter_is_used():
    res = run(jl({"prompt": "a b", "completion": "c"}), count_tokens=lambda s: len(s.split()))
    assert res.tokens == 2  # "a bc" -> 2 words


@pytest.mark.parametrize("line,reason", [
    ("not json at all", "not JSON"),
    ('{"prompt": "a", "completion": ', "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"prompt": "a"}', 'missing field "completion"'),
    ('{"completion": "a"}', 'missing field "prompt"'),
    ('{"prompt": "a", "completion": ""}', "empty completion"),
    ('{"prompt": "a", "completion": "   "}', "empty completion"),
    ('{"prompt": 1, "completion": "b"}', 'field "prompt" must be a string'),
    ('{"foo": 1}', 'missing field "completion"'),
    ('{"messages": []}', 'field "messages" must be a non-empty list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "user"}]}', 'missing field "messages[0].content"'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "the last message must be from the assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}', "empty completion"),
])
def test_each_reason_with_line_number(line, reason):
    good = json.dumps({"prompt": "p", "completion": "c"})
    res = run(f"{good}\n{good}\n{line}\n{good}\n")
    assert not res.ok
    assert res.error_count == 1 and res.rows == 3
    assert res.errors[0].startswith(f"line 3: {reason}")
    assert "line 3: " + reason in res.details


def test_not_utf8():
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    res = run(good + b"\n" + b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    assert res.errors == ["line 2: not UTF-8"]


def test_too_long_line_is_reported_and_not_buffered():
    good = json.dumps({"prompt": "p", "completion": "c"})
    long = json.dumps({"prompt": "x" * 5000, "completion": "c"})
    res = run(f"{good}\n{long}\n{good}\n", max_line_bytes=1000)
    assert not res.ok and res.rows == 2
    assert res.errors[0].startswith("line 2: too long (")
    assert "limit 1000" in res.errors[0]


def test_iter_lines_across_chunk_boundaries_and_crlf():
    chunks = [b"ab", b"c\r\nde", b"f\n\n", b"gh"]
    assert [(n, b) for n, b, _ in iter_lines(chunks, 100)] == [(1, b"abc"), (2, b"def"), (3, b""), (4, b"gh")]
    out = list(iter_lines([b"x" * 50, b"x" * 60, b"\nok\n"], 100))
    assert out[0][0] == 1 and out[0][1] is None and out[0][2] == 110
    assert out[1][:2] == (2, b"ok")


def test_blank_lines_skipped_and_line_numbers_kept():
    good = json.dumps({"prompt": "p", "completion": "c"})
    res = run(f"\n{good}\n\n   \nnope\n")
    assert res.errors == ["line 5: not JSON"] and res.rows == 1


def test_error_list_is_capped_with_count():
    res = run("bad\n" * 50, max_errors=5)
    assert res.error_count == 50 and len(res.errors) == 5
    assert res.details.startswith("50 bad lines: line 1: not JSON")
    assert "and 45 more bad lines" in res.details


def test_empty_file_is_an_error():
    res = run("\n\n")
    assert not res.ok and res.rows == 0
    assert "empty" in res.details


def test_utf8_bom_first_line_ok():
    res = run("\ufeff" + jl({"prompt": "p", "completion": "c"}))
    assert res.ok


def test_base_train_text_and_jsonl():
    res = run("first doc\n\nsecond doc\n", purpose="base-train", fmt="text")
    assert res.ok and res.rows == 2
    res = run(jl({"text": "a doc"}, {"text": ""}, {"txt": "x"}, {"text": 3}), purpose="base-train", fmt="jsonl")
    assert [e.split(":", 1)[0] for e in res.errors] == ["line 2", "line 3", "line 4"]
    assert "empty text" in res.errors[0] and 'missing field "text"' in res.errors[1]
    assert 'field "text" must be a string' in res.errors[2]
    res = run(b"ok\n\xff\n", purpose="base-train", fmt="text")
    assert res.errors == ["line 2: not UTF-8"]


def test_detect_format():
    assert detect_format("x.jsonl", "fine-tune") == "jsonl"
    assert detect_format("x.txt", "fine-tune") == "jsonl"
    assert detect_format("corpus.txt", "base-train") == "text"
    assert detect_format("corpus.JSONL", "base-train") == "jsonl"


def test_unknown_purpose_raises():
    with pytest.raises(ValueError):
        run("x", purpose="nope")


def test_random_bytes_never_crash():
    rng = random.Random(0)
    pieces = [b"{", b"}", b'"prompt"', b'"completion"', b":", b",", b"\n", b"\xff", b"[", b"]", b'"', b"\\",
              b"null", b"1e999", b'"messages"', b"\r", b" "]
    for _ in range(400):
        if rng.random() < 0.5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        else:
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        for purpose, fmt in (("fine-tune", "jsonl"), ("base-train", "text"), ("base-train", "jsonl")):
            res = run(data, purpose=purpose, fmt=fmt, max_line_bytes=64)
            assert res.ok == (res.error_count == 0 and res.rows > 0)
            for e in res.errors:
                assert e.startswith("line ") and ": " in e
    # deep nesting is "not JSON", not a crash
    res = run("[" * 100000 + "\n")
    assert not res.ok
