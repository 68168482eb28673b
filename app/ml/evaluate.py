"""Evaluation of a base, with or without a prefix, on prompt/completion examples.

Metrics (all on the same examples):
- `loss`, `perplexity`: mean negative log-likelihood per completion token, the EOS that ends each
  completion included (the same tokens prefix training counts), and `exp(loss)`.
- `exact_match`: share of distinct prompts whose greedy generation equals one of that prompt's
  references, after stripping and collapsing whitespace.
- `bleu`, `chrf`: sacrebleu corpus BLEU and chrF of the greedy generations. Examples are grouped by
  prompt, one hypothesis per distinct prompt and all of that prompt's completions as its references
  (multi-reference, as in E2E).

Tokenisation is training's (`data.tokenize_example`: prompt ids + completion ids + EOS, encoded
separately). The loss runs directly on `kvcache`'s rule (prefix slots right-aligned, mask `[prefix | tokens]`,
positions `positions_from_mask`), with a `FrozenPrefixCache`; generation goes through
`app.ml.generate.generate` at temperature 0.

`compare(base, examples, prefix)` reports the base alone, the base with the prefix, and the gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import sacrebleu
import torch

from app.ml.data import Example, encode_prompt, tokenize_example
from app.ml.generate import GenerationRequest, generate
from app.ml.kvcache import KV, FrozenPrefixCache, batch_prefixes, keeps_logits_by_mask, positions_from_mask

METRICS = ("loss", "perplexity", "exact_match", "bleu", "chrf")


# ----------------------------------------------------------------------------- helpers


def normalize_text(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def _pair(example: Any) -> tuple[str, str]:
    """(prompt, completion) from an `Example`, a `{"prompt", "completion"}` dict or a 2-tuple."""
    if isinstance(example, dict):
        return str(example["prompt"]), str(example["completion"])
    if isinstance(example, (tuple, list)):
        prompt, completion = example
        return str(prompt), str(completion)
    return str(example.prompt), str(example.completion)


def group_references(examples: Iterable[Any]) -> tuple[list[str], list[list[str]]]:
    """Distinct prompts in first-seen order, and for each the list of all its completions."""
    refs: dict[str, list[str]] = {}
    for ex in examples:
        prompt, completion = _pair(ex)
        refs.setdefault(prompt, []).append(completion)
    return list(refs), list(refs.values())


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants reference *streams* of equal length; pad short reference sets with None
    (which sacrebleu skips)."""
    width = max((len(r) for r in references), default=0)
    return [[normalize_text(r[i]) if i < len(r) else None for r in references] for i in range(width)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100), `references[i]` being all references of `hypotheses[i]`."""
    if not hypotheses:
        return 0.0
    hyps = [normalize_text(h) for h in hypotheses]
    return float(sacrebleu.corpus_bleu(hyps, _ref_streams(references)).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100), multi-reference like `corpus_bleu`."""
    if not hypotheses:
        return 0.0
    hyps = [normalize_text(h) for h in hypotheses]
    return float(sacrebleu.corpus_chrf(hyps, _ref_streams(references)).score)


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of hypotheses equal (after `normalize_text`) to any of their references."""
    if not hypotheses:
        return 0.0
    hits = sum(
        normalize_text(h) in {normalize_text(r) for r in refs} for h, refs in zip(hypotheses, references, strict=False)
    )
    return hits / len(hypotheses)


def prefix_key_values(prefix: Any, dtype: torch.dtype, device) -> KV | None:
    """A per-layer KV list from None, a KV list, an `Adapter` (`key_values(dtype, device)`) or a
    `PrefixEncoder` (`key_values(dtype)`)."""
    if prefix is None:
        return None
    if hasattr(prefix, "key_values"):
        try:
            kv = prefix.key_values(dtype=dtype, device=device)
        except TypeError:
            kv = prefix.key_values(dtype)
    else:
        kv = prefix
    return [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in kv]


def _model_dtype_device(base) -> tuple[torch.dtype, Any]:
    p = next(base.model.parameters())
    return p.dtype, p.device


# ----------------------------------------------------------------------------- loss


@torch.no_grad()
def completion_nll(base, examples: Sequence[Any], prefix: Any = None, batch_size: int = 16) -> tuple[float, int]:
    """Sum of negative log-likelihoods of completion tokens (+EOS), and how many tokens."""
    model, tok = base.model, base.tokenizer
    dtype, device = _model_dtype_device(base)
    kv = prefix_key_values(prefix, dtype, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    P = 0 if kv is None else int(kv[0][0].shape[1])
    max_len = base.geometry.max_positions - P
    # the training tokenisation: prompt ids + completion ids + EOS, labels -100 on the prompt
    encoded = [tokenize_example(Example(*_pair(ex)), tok, max_len) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        L = max(len(x) for x in rows)
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        tmask = torch.zeros(len(rows), L, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for r, x in enumerate(rows):
            n = len(x)
            ids[r, L - n :] = torch.tensor(x.input_ids)
            tmask[r, L - n :] = 1
            labels[r, L - n :] = torch.tensor(x.labels)
        ids, tmask, labels = ids.to(device), tmask.to(device), labels.to(device)
        if kv is not None:
            batch_kv, pmask = batch_prefixes([kv] * len(rows), base.geometry, dtype, device)
            full = torch.cat([pmask, tmask], 1)
            cache = FrozenPrefixCache(batch_kv)
        else:
            full, cache = tmask, None
        kwargs = dict(input_ids=ids, attention_mask=full, position_ids=positions_from_mask(full, L), cache=cache,
                      use_cache=False)
        target = labels[:, 1:]
        predicts_label = target != -100
        if keeps_logits_by_mask(model):
            # the vocabulary projection only where the next token is a label, as in training: the
            # prompt positions' logits were computed and thrown away
            logits = model(**kwargs, logits_to_keep=torch.nn.functional.pad(predicts_label, (0, 1))).logits.float()
            nll = torch.nn.functional.cross_entropy(logits, target[predicts_label], reduction="sum")
        else:
            logits = model(**kwargs).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        total += float(nll)
        count += int(predicts_label.sum())
    return total, count


# ----------------------------------------------------------------------------- generation


def greedy_generations(
    base, prompts: Sequence[str], prefix: Any = None, max_new_tokens: int = 64, batch_size: int = 16,
    stop: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions of `prompts` through `app.ml.generate.generate` (mixed-prefix engine)."""

    dtype, device = _model_dtype_device(base)
    kv = prefix_key_values(prefix, dtype, device)
    tok = base.tokenizer
    texts: list[str] = [""] * len(prompts)
    P = 0 if kv is None else int(kv[0][0].shape[1])
    room = base.geometry.max_positions - P - max_new_tokens  # generate refuses longer contexts
    if room < 1:
        raise ValueError(f"prefix ({P}) + max_new_tokens ({max_new_tokens}) leave no room for a prompt")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [(encode_prompt(tok, p) or [bos])[-room:] for p in prompts]  # as training encodes prompts
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        reqs = [GenerationRequest(prompt_ids=list(ids[i]), prefix=kv, max_tokens=max_new_tokens, temperature=0.0,
                                  stop=list(stop or [])) for i in chunk]
        for i, res in zip(chunk, generate(base, reqs), strict=False):
            texts[i] = res.text
    return texts


# ----------------------------------------------------------------------------- public


def evaluate(
    base,
    examples: Sequence[Any],
    prefix: Any = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    generate_text: bool = True,
    return_generations: bool = False,
    stop: Sequence[str] | None = None,
) -> dict:
    """Metrics of `base` (+ `prefix`) on `examples` (see the module docstring).

    `prefix`: None, a per-layer KV list, or anything with `.key_values()` (Adapter, PrefixEncoder).
    `generate_text=False` skips generation (exact_match, bleu and chrf are then None).
    `stop`: stop strings for generation (e.g. `["\\n"]` when references are single lines).
    `return_generations=True` adds `generations: [{prompt, text, references}]`.
    """
    examples = list(examples)
    was_training = base.model.training
    base.model.eval()
    try:
        nll, ntok = completion_nll(base, examples, prefix, batch_size)
        loss = nll / ntok if ntok else float("nan")
        result: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)) if ntok else float("nan"),
            "exact_match": None,
            "bleu": None,
            "chrf": None,
            "n": len(examples),
            "n_prompts": 0,
            "completion_tokens": ntok,
        }
        if generate_text and examples:
            prompts, refs = group_references(examples)
            hyps = greedy_generations(base, prompts, prefix, max_new_tokens, batch_size, stop)
            result.update(
                exact_match=exact_match(hyps, refs),
                bleu=corpus_bleu(hyps, refs),
                chrf=corpus_chrf(hyps, refs),
                n_prompts=len(prompts),
            )
            if return_generations:
                result["generations"] = [
                    {"prompt": p, "text": h, "references": r} for p, h, r in zip(prompts, hyps, refs, strict=False)
                ]
    finally:
        base.model.train(was_training)
    return result


def compare(base, examples: Sequence[Any], prefix: Any, **kwargs) -> dict:
    """`{"base": metrics without prefix, "prefix": metrics with it, "gain": prefix - base}`."""
    without = evaluate(base, examples, None, **kwargs)
    with_prefix = evaluate(base, examples, prefix, **kwargs)
    gain = {}
    for k in METRICS:
        a, b = without.get(k), with_prefix.get(k)
        gain[k] = None if a is None or b is None else b - a
    return {"base": without, "prefix": with_prefix, "gain": gain}
