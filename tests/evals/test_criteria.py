"""Each criterion against known values: hand-computed, or the example its library or the
original script documents; edge cases (empty output, unicode) included."""

import math

import pytest

from app.evals import (
    EntityF1,
    ItemError,
    Label,
    Sample,
    SpanF1,
    StringCheck,
    TextSimilarity,
    text_metrics,
)


def check(op, text, ref):
    c = StringCheck(type="string_check", name="s", input="{{sample.output_text}}", reference=ref, operation=op)
    r = c.grade({}, Sample(text))
    assert r.score == (1.0 if r.passed else 0.0)
    return r.passed


def test_string_check_operations():
    assert check("eq", "Paris", "Paris") and not check("eq", "Paris", "paris")
    assert check("ne", "Paris", "paris") and not check("ne", "Paris", "Paris")
    # like / ilike: the input contains the reference (OpenAI's graders guide), case-sensitive or not.
    assert check("like", "The answer is Paris.", "Paris") and not check("like", "the answer is paris", "Paris")
    assert check("ilike", "THE ANSWER IS PARIS", "paris")
    # Containment, not SQL patterns: % and _ are literal.
    assert not check("like", "Paris", "P%s") and check("like", "100% sure", "100%")
    # Unicode caseless matching, and the empty cases.
    assert check("ilike", "Hauptstraße 1", "STRASSE") and check("ilike", "ΣΊΣΥΦΟΣ", "σίσυφος")
    assert check("eq", "", "") and check("like", "anything", "") and not check("like", "", "x")


def sim(metric, text, ref, threshold=0.5):
    c = TextSimilarity(type="text_similarity", name="t", input="{{sample.output_text}}",
                       reference="{{item.ref}}", evaluation_metric=metric, pass_threshold=threshold)
    return c.grade({"ref": ref}, Sample(text))


@pytest.mark.parametrize("metric, text, ref, expected", [
    # sacrebleu sentence BLEU / 100: n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty.
    ("bleu", "a b c d e", "a b c d f", 0.2 ** 0.25),
    ("bleu", "the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("bleu", "", "the cat", 0.0),
    # chrF / 100 (char 6-grams, beta 2): P = 1, R = mean(6/7, 5/6, 4/5, 3/4, 2/3, 1/2).
    ("chrf", "the cat", "the cats", 5 * (4.407142857142857 / 6) / (4 + 4.407142857142857 / 6)),
    ("chrf", "", "abc", 0.0),
    # rapidfuzz ratio = 1 - Indel distance / total length: LCS("kitten", "sitting") = 4 -> 8/13.
    ("fuzzy_match", "kitten", "sitting", 8 / 13),
    ("fuzzy_match", "", "abc", 0.0),
    # ROUGE F-measures: 3 of 3 unigrams / 3 of 6; bigrams 2 of 2 / 2 of 5; LCS 3.
    ("rouge_1", "the cat sat", "the cat sat on the mat", 2 / 3),
    ("rouge_2", "the cat sat", "the cat sat on the mat", 4 / 7),
    ("rouge_3", "the cat sat", "the cat sat on the mat", 2 * (1 * 0.25) / 1.25),
    ("rouge_4", "the cat sat", "the cat sat on the mat", 0.0),
    ("rouge_5", "a b c d e f", "a b c d e f", 1.0),
    ("rouge_l", "the cat sat", "the cat sat on the mat", 2 / 3),
    ("rouge_l", "", "the cat", 0.0),
    # Unicode words are words (rouge-score's default tokenizer would drop them and say 0).
    ("rouge_1", "Привет мир", "Привет мир", 1.0),
    ("rouge_l", "café crème", "Café au lait", 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)),
    # GLEU = min(n-gram precision, recall), n = 1..4: 6 of 10 n-grams shared.
    ("gleu", "a b c d", "a b c e", 0.6),
    ("gleu", "", "a b", 0.0),
])
def test_text_similarity_known_values(metric, text, ref, expected):
    r = sim(metric, text, ref)
    assert r.score == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= r.score <= 1.0
    assert r.passed == (r.score >= 0.5)


def test_pass_threshold_is_inclusive_and_on_the_0_1_scale():
    assert sim("gleu", "a b c d", "a b c e", threshold=0.6).passed
    assert not sim("gleu", "a b c d", "a b c e", threshold=0.61).passed
    assert sim("bleu", "same words here", "same words here", threshold=1.0).passed  # 100.00000000000004 clamped


@pytest.mark.skipif(
    not text_metrics.wordnet_available(), reason="no WordNet on this machine (meteor is refused at creation)"
)
def test_meteor_when_wordnet_is_installed():
    assert sim("meteor", "the cat sat on the mat", "the cat sat on the mat").score > 0.99


def test_missing_reference_value_is_an_item_error():
    with pytest.raises(ItemError):
        sim("bleu", "x", None)


def label(normalize="mean", labels=(" yes", " something else entirely")):
    return Label(type="label", name="cls", labels=list(labels), normalize=normalize)


def test_label_mean_normalisation_does_not_penalise_long_labels():
    # " yes": one token at -2.0; the long label: three tokens summing to -3.0 (-1.0 per token).
    scores = {" yes": (-2.0, 1), " something else entirely": (-3.0, 3)}
    calls = []

    def score_labels(prompt, labels):
        calls.append(prompt)
        return [scores[label] for label in labels]

    item = {"label": "something else entirely"}
    mean = label("mean").grade(item, Sample("", prompt="Q: ?\nA:"), score_labels=score_labels)
    assert calls == ["Q: ?\nA:"]
    assert mean.passed and mean.score == 1.0
    assert mean.details["predicted"] == " something else entirely"
    assert mean.details["scores"] == {" yes": -2.0, " something else entirely": -1.0}
    assert mean.details["probabilities"][" something else entirely"] == pytest.approx(1 / (1 + math.exp(-1)))
    # normalize: none ranks by the summed log-probability, as lm-evaluation-harness's acc does.
    summed = label("none").grade(item, Sample(""), score_labels=score_labels)
    assert not summed.passed and summed.score == 0.0 and summed.details["predicted"] == " yes"
    assert summed.details["reference"] == " something else entirely"  # matched ignoring whitespace


def test_label_item_errors_and_wiring_errors():
    def ok(prompt, labels):
        return [(-1.0, 1)] * len(labels)

    with pytest.raises(ItemError, match="not one of the labels"):
        label().grade({"label": "maybe"}, Sample(""), score_labels=ok)
    with pytest.raises(ItemError, match="no tokens"):
        label().grade({"label": "yes"}, Sample(""), score_labels=lambda p, labels: [(0.0, 0)] * len(labels))
    with pytest.raises(ValueError):
        label().grade({"label": "yes"}, Sample(""))
    with pytest.raises(ValueError):
        label().grade({"label": "yes"}, Sample(""), score_labels=lambda p, labels: [(-1.0, 1)])
    # Ties go to the first label, deterministically.
    assert label().grade({"label": "yes"}, Sample(""), score_labels=ok).details["predicted"] == " yes"


def span(text, gold, threshold=1.0):
    c = SpanF1(type="span_f1", name="qa", reference="{{item.answers}}", pass_threshold=threshold)
    return c.grade({"answers": gold}, Sample(text))


def test_span_f1_as_squad_scores():
    # Articles, punctuation and case are normalised away (official SQuAD script).
    r = span("The Denver Broncos!", "Denver Broncos")
    assert (r.details["exact_match"], r.details["f1"], r.passed) == (1.0, 1.0, True)
    # One of two tokens shared each way: P = R = F1 = 1/2.
    r = span("Broncos won", "Denver Broncos", threshold=0.5)
    assert (r.details["exact_match"], r.score, r.passed) == (0.0, 0.5, True)
    # Several gold answers: the best one counts.
    r = span("Santa Clara", ["Levi's Stadium", "Santa Clara, California"])
    assert r.details["f1"] == pytest.approx(0.8) and not r.passed
    # Empty answers (SQuAD 2.0 no-answer): empty vs empty matches, else 0.
    assert span("", "").score == 1.0 and span("", "Denver").score == 0.0 and span("Denver", "").score == 0.0
    # Unicode: lowercased; only ASCII punctuation is stripped, as the official script does.
    assert span("CAFÉ", "café").details["exact_match"] == 1.0
    assert span("«Paris»", "Paris").details["exact_match"] == 0.0
    with pytest.raises(ItemError):
        span("x", [1, 2])


def ner(text, gold, fmt="bio"):
    c = EntityF1(type="entity_f1", name="ner", reference="{{item.gold}}", format=fmt)
    return c.grade({"gold": gold}, Sample(text))


def test_entity_f1_bio_matches_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold, pred = ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "O"]
    r = ner(" ".join(pred), gold)
    assert r.details["precision"] == precision_score([gold], [pred]) == 1.0
    assert r.details["recall"] == recall_score([gold], [pred]) == 0.5
    assert r.score == pytest.approx(f1_score([gold], [pred])) == pytest.approx(2 / 3)
    # A span with the wrong type or boundary is wrong; a JSON list of tags reads too.
    assert ner('["B-ORG", "I-ORG", "O", "B-LOC"]', gold).details["correct"] == 1
    assert ner("B-PER O O B-LOC", gold).details["correct"] == 1
    # Lengths differ: padded with O / cut to the reference.
    r = ner("B-PER I-PER", gold)
    assert r.details["length_mismatch"] == [2, 4] and r.details["recall"] == 0.5
    # Nothing to find and nothing found is perfect; empty output against entities scores 0.
    assert ner("O O", ["O", "O"]).score == 1.0 and ner("", gold).score == 0.0
    assert ner("", "B-PER O").score == 0.0  # a whitespace-separated reference reads too
    with pytest.raises(ItemError):
        ner("O", [{"x": 1}])


def test_entity_f1_entity_lists():
    gold = [{"type": "PER", "text": "Ada Lovelace"}, ["LOC", "Zürich"], {"label": "ORG", "text": "ETH"}]
    r = ner('[["PER", "Ada Lovelace"], {"type": "LOC", "text": "Zürich "}, ["LOC", "London"]]', gold, "entities")
    assert (r.details["correct"], r.details["predicted"], r.details["gold"]) == (2, 3, 3)
    assert r.score == pytest.approx(2 / 3)
    # Duplicates count as a multiset: one gold "Ada" is matched once.
    r = ner('["Ada", "Ada"]', ["Ada"], "entities")
    assert (r.details["precision"], r.details["recall"]) == (0.5, 1.0)
    r = ner("no JSON here", gold, "entities")
    assert r.details["unparseable"] and r.score == 0.0
    assert ner("[]", [], "entities").score == 1.0


@pytest.mark.parametrize("metric", [m for m in text_metrics.TEXT_METRIC_FNS if m != "meteor"])
def test_empty_output_scores_zero_and_empty_pair_only_fuzzy_one(metric):
    assert sim(metric, "", "some reference").score == 0.0
    assert sim(metric, "", "").score == (1.0 if metric == "fuzzy_match" else 0.0)
