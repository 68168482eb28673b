"""WNUT-17 emerging entities, sequence labelling as an entity list: `python -m recipes.wnut17 --help`.

Data: wnut17/wnut17train.conll (3,394 sentences) to train, wnut17/emerging.dev.conll (1,009) to
evaluate; `TOKEN<TAB>BIO-TAG` per line, a blank line between sentences. The gold entities are the
BIO spans as seqeval reads them; their text is their tokens joined by spaces.
Format: prompt "Sentence: {tokens joined by spaces}\\nEntities:", completion
" {type}: {text}; {type}: {text}" in sentence order, or " none". The types are WNUT's own: person,
location, corporation, product, creative-work, group.
Scored as entity P/R/F1 (micro over the evaluation sentences): an entity counts when both its
type and its text match.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from app.evals.text_metrics import bio_entities
from recipes import scoring
from recipes.common import EvalItem, Example, Recipe, Split, main, task_file

TYPES = ("person", "location", "corporation", "product", "creative-work", "group")
NONE = "none"
SEP = "; "


def prompt(tokens: list[str]) -> str:
    return f"Sentence: {' '.join(tokens)}\nEntities:"


def read(path: Path) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) per sentence."""
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        token, sep, tag = line.rpartition("\t")
        if not sep or not token.strip() or not (tag == "O" or tag[:2] in ("B-", "I-")):
            raise ValueError(f"{path}:{n}: expected 'TOKEN<TAB>BIO-TAG'")
        tokens.append(token.strip())
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """(type, text) of each BIO span, in sentence order (seqeval's end index is inclusive)."""
    return [(kind, " ".join(tokens[start:end + 1])) for kind, start, end in bio_entities(tags)]


def render(ents: list[tuple[str, str]]) -> str:
    return " " + (SEP.join(f"{kind}: {text}" for kind, text in ents) if ents else NONE)


# "; " ends an entity only before the next "type: " (an entity's text may hold "; ": "Simon &amp; Schuster")
_NEXT_ENTITY = re.compile(f"{SEP}(?=(?:{'|'.join(map(re.escape, TYPES))}):)")


def parse(output: str) -> list[tuple[str, str]]:
    """The entities of an output in `render`'s format; a part that is not `type: text` with a
    known type is dropped (it predicts nothing)."""
    out = []
    for part in _NEXT_ENTITY.split(output.strip()):
        kind, sep, text = part.strip().partition(":")
        if sep and kind.strip() in TYPES and text.strip():
            out.append((kind.strip(), text.strip()))
    return out


def load(root: Path) -> Split:
    train = [Example(prompt(tok), render(entities(tok, tag)))
             for tok, tag in read(task_file(root, "wnut17", "wnut17train.conll"))]
    items = [EvalItem(prompt(tok), entities(tok, tag))
             for tok, tag in read(task_file(root, "wnut17", "emerging.dev.conll"))]
    return Split(train, items)


def score(items, outputs):
    return scoring.entities([parse(o) for o in outputs], [it.gold for it in items])


RECIPE = Recipe(name="wnut17", description="WNUT-17 entities, sentence -> entity list", load=load, score=score,
                headline="f1", max_tokens=48)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
