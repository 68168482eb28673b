"""Text metrics on the [0, 1] scale, each a thin call into the library that defines it.

Libraries are imported on first use: the API process validates evals without paying for NLTK,
rouge-score or scikit-learn at start-up.

| metric        | library                                   | scale                              |
| ------------- | ----------------------------------------- | ---------------------------------- |
| bleu          | sacrebleu `sentence_bleu` (its defaults)  | BLEU / 100                         |
| chrf (ours)   | sacrebleu `sentence_chrf`                 | chrF / 100                         |
| fuzzy_match   | rapidfuzz `fuzz.ratio`                    | ratio / 100                        |
| rouge_1..5, l | rouge-score `RougeScorer` F-measure       | as is                              |
| gleu          | nltk `sentence_gleu`                      | as is                              |
| meteor        | nltk `meteor_score`, needs WordNet        | as is                              |
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

TEXT_METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                "rouge_5", "rouge_l", "chrf")
# In OpenAI's enum but needing an embeddings model, which this server does not have.
UNSUPPORTED_TEXT_METRICS = {"cosine": "it needs an embeddings model, which this server does not serve"}


def _clamp(x: float) -> float:
    # sacrebleu returns 100.00000000000004 for identical sentences; keep the documented scale.
    return min(1.0, max(0.0, float(x)))


def bleu(output: str, reference: str) -> float:
    import sacrebleu

    return _clamp(sacrebleu.sentence_bleu(output, [reference]).score / 100.0)


def chrf(output: str, reference: str) -> float:
    import sacrebleu

    return _clamp(sacrebleu.sentence_chrf(output, [reference]).score / 100.0)


def fuzzy_match(output: str, reference: str) -> float:
    # rapidfuzz's ratio is the normalised Indel similarity (what difflib's SequenceMatcher.ratio
    # approximates with its junk heuristics), computed exactly and fast.
    from rapidfuzz import fuzz

    return _clamp(fuzz.ratio(output, reference) / 100.0)


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import tokenizers

    class UnicodeTokenizer(tokenizers.Tokenizer):
        """rouge-score's default tokenizer keeps only [a-z0-9], so Cyrillic, Greek or accented
        text loses its words and identical strings score 0. This keeps every Unicode letter and
        digit; on ASCII text it yields the same tokens as the default (no stemming in either)."""

        def tokenize(self, text):
            return re.sub(r"[\W_]+", " ", text.lower()).split()

    return UnicodeTokenizer()


@functools.lru_cache(maxsize=8)
def _rouge_scorer(rouge_type: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], tokenizer=_rouge_tokenizer())


def rouge(rouge_type: str) -> Callable[[str, str], float]:
    def score(output: str, reference: str) -> float:
        # rouge-score's argument order is (target, prediction).
        return _clamp(_rouge_scorer(rouge_type).score(reference, output)[rouge_type].fmeasure)

    return score


def gleu(output: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    # Whitespace tokens, as NLTK's own examples do; GLEU is defined on token n-grams.
    return _clamp(sentence_gleu([reference.split()], output.split()))


@functools.lru_cache(maxsize=1)
def wordnet_available() -> bool:
    """METEOR's synonym stage needs the WordNet database. No package on PyPI ships it for offline
    use (nltk fetches it with `nltk.download`; `wn` downloads at run time), so it is there only if
    an operator put NLTK's `wordnet` corpus under NLTK_DATA."""
    import nltk

    for name in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(name)
            return True
        except LookupError:
            continue
    return False


def meteor(output: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    return _clamp(meteor_score([reference.split()], output.split()))


TEXT_METRIC_FNS: dict[str, Callable[[str, str], float]] = {
    "bleu": bleu,
    "chrf": chrf,
    "fuzzy_match": fuzzy_match,
    "gleu": gleu,
    "meteor": meteor,
    **{f"rouge_{n}": rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": rouge("rougeL"),
}


# --- SQuAD answer scoring -------------------------------------------------------------------
# No registry package computes it offline: `evaluate`'s squad metric is a script it downloads
# from the Hugging Face hub. So here are the few lines of the official SQuAD 2.0 evaluation
# script (evaluate-v2.0.py, Rajpurkar et al., https://rajpurkar.github.io/SQuAD-explorer/),
# unchanged in behaviour: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse
# whitespace; F1 over the bag of tokens; empty vs empty counts as a match (no-answer questions).

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    num_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1), each the max over the gold answers, as the official script takes it."""
    if not golds:
        golds = [""]
    return max(squad_exact(prediction, g) for g in golds), max(squad_f1(prediction, g) for g in golds)


# --- entity spans ---------------------------------------------------------------------------

def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO/IOB tag sequence, as seqeval's default (conlleval) mode
    reads them."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [tuple(e) for e in get_entities(list(tags))]


def prf(correct: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from span counts, as seqeval's micro average computes them; with
    nothing to find and nothing found the item is perfect (seqeval's 0/0 would say 0)."""
    if n_pred == 0 and n_gold == 0:
        return 1.0, 1.0, 1.0
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f
