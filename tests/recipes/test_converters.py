"""The recipes' converters on the real files (skipped when the data root is absent): row counts,
known rows, the documented formats, and splits that keep E2E MRs, TREC questions and QA-SRL
sentences on one side only. Plus their scorers and the output parser on hand-made values."""

from __future__ import annotations

import pytest

from recipes import NAMES, e2e, qasrl, scoring, sst2, trec, wnut17
from recipes.common import RecipeError, data_root, hold_out, sample


@pytest.fixture(scope="module")
def root():
    try:
        return data_root()
    except RecipeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def splits(root):
    import importlib

    return {name: importlib.import_module(f"recipes.{name}").RECIPE.load(root) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_rows_follow_the_documented_format(splits, name):
    split = splits[name]
    assert split.train and split.eval
    for e in split.train:
        # the completion starts with a space and holds no newline (evaluation stops at one);
        # the prompt ends with the format's separator, without a trailing space
        assert e.completion.startswith(" ") and e.completion.strip() and "\n" not in e.completion
        assert e.prompt.endswith((":", "=>")) and not e.prompt.endswith(" ")
    shared = {e.prompt for e in split.train} & {it.prompt for it in split.eval}
    # our splits share no prompt; Multi30k's own train and val have one English sentence in common
    assert len(shared) == (1 if name == "multi30k" else 0), shared


def test_sst2(splits):
    s = splits["sst2"]
    assert (len(s.train), len(s.eval)) == (6920, 872)
    assert s.train[0].prompt == ("Review: a stirring , funny and finally transporting re-imagining of beauty and the "
                                 "beast and 1930s horror films\nSentiment:")
    assert s.train[0].completion == " positive"
    assert s.eval[0].prompt == "Review: one long string of cliches .\nSentiment:" and s.eval[0].gold == "negative"
    assert {e.completion for e in s.train} == {" positive", " negative"}
    assert sst2.RECIPE.labels == (" negative", " positive")


def test_trec_holds_out_a_seeded_tenth_of_its_questions(root, splits):
    s = splits["trec"]
    rows = trec.read(root / "trec" / "TREC.train.raw")
    assert len(rows) == 5452
    distinct = {q for q, _ in rows}
    held = {it.prompt for it in s.eval}
    assert len(held) == len(s.eval) == round(len(distinct) * trec.HOLD_OUT)
    # every copy of a held-out question is held out: the two sides share no question
    assert not held & {e.prompt for e in s.train}
    assert len(s.train) + sum(1 for q, _ in rows if trec.prompt(q) in held) == len(rows)
    assert ("How did serfdom develop in and then leave Russia ?", "DESC") == rows[0]
    assert {it.gold for it in s.eval} == {c.strip() for c in trec.CLASSES.values()}
    # the file is Latin-1; its one non-ASCII question decodes to a letter, not a replacement mark
    (odd,) = [q for q, _ in rows if not q.isascii()]
    assert "\ufffd" not in odd
    assert trec.load(root) == s  # seeded: the same split every time


def test_qasrl_splits_by_sentence(root, splits):
    s = splits["qasrl"]
    questions = qasrl.read(root)
    sentences = {sid for sid, _, _ in questions}
    assert len(sentences) == 1000  # the gold files' sentences that have questions (500 per domain)
    eval_ids = {it.gold["sentence_id"] for it in s.eval}
    assert len(eval_ids) == round(len(sentences) * qasrl.HOLD_OUT)
    # no sentence on both sides: compare the sentences the prompts carry
    def sentence_of(p):
        return p.split("\n", 1)[0]
    assert not {sentence_of(e.prompt) for e in s.train} & {sentence_of(it.prompt) for it in s.eval}
    assert len(s.train) + len(s.eval) == len(questions)
    first = s.train[0]
    assert first.prompt == ("Sentence: Searches are presently suspended until morning .\nVerb: suspended\n"
                            "Question: How long is something being suspended?\nAnswer:")
    assert first.completion == " until morning"
    # an annotator's several spans are all acceptable answers
    (ump,) = [q for (sid, _, question), q in questions.items()
              if sid == "Wiki1k:wikinews:721315:3:1" and question == "How has someone responded to something?"]
    assert ump["answers"] == ["with UMP politician Hervé Mariton calling for a boycott", "with outrage"]


def test_multi30k(splits):
    s = splits["multi30k"]
    assert (len(s.train), len(s.eval)) == (29000, 1014)
    assert s.eval[0].prompt == "English: A group of men are loading cotton onto a truck\nGerman:"
    assert s.eval[0].gold == ["Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"]
    assert s.train[0].completion == " Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."


def test_e2e_splits_by_mr(root, splits):
    s = splits["e2e"]
    refs = e2e.read(root)
    assert len(refs) == 547 and sum(map(len, refs.values())) == 4672
    eval_mrs = {it.prompt for it in s.eval}
    assert len(eval_mrs) == len(s.eval) == round(547 * e2e.HOLD_OUT)
    assert not eval_mrs & {e.prompt for e in s.train}, "an MR is on both sides"
    # every reference of an evaluation MR is a reference to score against; the rest are training rows
    assert sum(len(it.gold) for it in s.eval) + len(s.train) == 4672
    assert s.train[0].prompt == "name[Alimentum], area[city centre], familyFriendly[no] =>"
    assert s.train[0].completion == " There is a place in the city centre, Alimentum, that is not family-friendly."


def test_wnut17_entities_and_their_format(root, splits):
    s = splits["wnut17"]
    assert (len(s.train), len(s.eval)) == (3394, 1009)
    empire = [e for e in s.train if "Empire State Building = ESB" in e.prompt][0]
    assert empire.completion == " location: Empire State Building; location: ESB"
    assert s.eval[0].gold == [] and s.eval[0].prompt.endswith("insane and good .\nEntities:")
    # the output format reads back into the gold entities, for every training sentence
    sentences = wnut17.read(root / "wnut17" / "wnut17train.conll")
    for (tokens, tags), e in zip(sentences, s.train, strict=True):
        assert wnut17.parse(e.completion) == wnut17.entities(tokens, tags)
    assert {t for e in s.eval for t, _ in e.gold} == set(wnut17.TYPES)


def test_wnut17_parse_keeps_only_typed_entities():
    assert wnut17.parse(" none") == [] and wnut17.parse("animal: cat") == []
    assert wnut17.parse("person: Ann; location:; product: iPhone X") == [("person", "Ann"), ("product", "iPhone X")]
    # "; " inside an entity's text does not split it: only "; " before a known type does
    assert wnut17.parse(" group: Simon &amp; Schuster; person: Ann") == [
        ("group", "Simon &amp; Schuster"), ("person", "Ann")]


def test_hold_out_and_sample_are_seeded_and_order_free():
    keys = [f"k{i}" for i in range(100)]
    assert hold_out(keys, 0.1) == hold_out(list(reversed(keys)), 0.1)
    assert len(hold_out(keys, 0.1)) == 10 and hold_out(keys, 0.1) != hold_out(keys, 0.1, seed=1)
    assert sample(keys, 5, 3) == sample(keys, 5, 3) != sample(keys, 5, 4)
    assert sorted(sample(keys, None, 0)) == sorted(keys)


def test_scorers():
    assert scoring.labels([" a", " b"], ["a", "b", "b"], ["a", "a", "b"], macro_f1=True) == {
        "accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3)}
    assert scoring.spans(["the until morning", "x"], [["until morning"], ["y", "x"]]) == {
        "f1": 1.0, "exact_match": 1.0}
    text = "the cat sat on the mat today"
    got = scoring.corpus_text([text, "a dog"], [[text], ["a dog ran", "a dog"]], rouge_l=True)
    assert got["bleu"] > 90 and got["rouge_l"] == pytest.approx(1.0)
    assert scoring.entities([[("person", "Ann"), ("group", "x")]], [[("person", "Ann")]]) == {
        "f1": pytest.approx(2 / 3), "precision": 0.5, "recall": 1.0}
