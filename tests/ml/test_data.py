import random

import pytest

from app.ml.data import (
    IGNORE_INDEX,
    Example,
    bucket_batches,
    collate,
    example_from_record,
    format_chat,
    tokenize_example,
)
from tests.conftest import _tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return _tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_record():
    assert example_from_record({"prompt": "a ->", "completion": " b"}) == Example("a ->", " b")
    for bad in ({"prompt": "x"}, {"completion": "y"}, {"prompt": 1, "completion": "y"}, [], {"messages": []}):
        with pytest.raises(ValueError):
            example_from_record(bad)


def test_chat_record_fallback_format():
    rec = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Food?"}]},
        {"role": "assistant", "content": "Pizza"},
    ]}
    ex = example_from_record(rec)  # no tokenizer, and the tiny one has no template: plain fallback
    assert ex.prompt == "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Food?\nassistant: "
    assert ex.completion == "Pizza"
    with pytest.raises(ValueError, match="assistant"):
        example_from_record({"messages": [{"role": "user", "content": "Hi"}]})


def test_chat_record_uses_tokenizer_template(tok):
    t = _tiny_tokenizer()
    t.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ex = example_from_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, t
    )
    assert ex == Example("<user>Hi<assistant>", "Yo")
    assert format_chat([{"role": "user", "content": "Hi"}], t, add_generation_prompt=False) == "<user>Hi"


def test_labels_mask_prompt_and_count_eos(tok):
    ex = Example("name: Aromi ->", " Chinese food")
    t = tokenize_example(ex, tok, max_seq_len=64)
    p, c = ids(tok, ex.prompt), ids(tok, ex.completion)
    assert t.input_ids == p + c + [tok.eos_token_id]
    assert t.labels == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]
    assert t.num_label_tokens == len(c) + 1


def test_truncation_keeps_completion_and_prompt_end(tok):
    ex = Example("the quick brown fox jumps over the lazy dog ->", " city")
    c = ids(tok, ex.completion) + [tok.eos_token_id]
    t = tokenize_example(ex, tok, max_seq_len=len(c) + 3)
    assert len(t) == len(c) + 3
    assert t.input_ids[-len(c) :] == c and t.labels[-len(c) :] == c
    assert t.input_ids[:3] == ids(tok, ex.prompt)[-3:]  # prompt cut from the left
    # a completion longer than the budget keeps its start and one prompt token
    t = tokenize_example(Example("a", " the quick brown fox"), tok, max_seq_len=3)
    assert len(t) == 3 and t.labels[0] == IGNORE_INDEX and t.labels[1:] == ids(tok, " the quick brown fox")[:2]
    # an empty prompt still gives the first completion token something to be predicted from
    t = tokenize_example(Example("", " dog"), tok, max_seq_len=16)
    assert t.input_ids[0] == tok.eos_token_id and t.labels[0] == IGNORE_INDEX


def test_collate_left_pads(tok):
    a = tokenize_example(Example("a b c d", " x"), tok, 32)
    b = tokenize_example(Example("a", " x"), tok, 32)
    batch = collate([a, b], pad_id=tok.eos_token_id)
    L = len(a)
    assert batch["input_ids"].shape == (2, L)
    assert batch["attention_mask"][1].tolist() == [0] * (L - len(b)) + [1] * len(b)
    assert batch["labels"][1, : L - len(b)].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, L - len(b) :].tolist() == b.input_ids


def test_bucket_batches_deterministic_complete_and_tight():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(500)]
    b1 = bucket_batches(lengths, 8, seed=3, epoch=1)
    assert b1 == bucket_batches(lengths, 8, seed=3, epoch=1)
    assert b1 != bucket_batches(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in b1 for i in b) == list(range(500))
    assert len(b1) == 63 and all(len(b) <= 8 for b in b1)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    order = list(range(500))
    random.Random(1).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 500, 8)]
    assert padding(b1) < 0.2 * padding(plain)
