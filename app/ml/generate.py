"""Mixed-prefix generation and scoring over one frozen base.

`generate` runs a batch of requests, each with its own prefix (or none), through shared forward
passes, following THE rule of `kvcache.py`: prefixes right-aligned in P_max cache slots, prompts
left-padded, mask `[prefix slots | tokens]`, position ids from `positions_from_mask`. So every row
computes exactly what it computes alone.

We write our own decode loop rather than calling HF `generate` because we need, per row: its own
sampling settings and seeded generator, stop strings, streaming with correct text deltas, aborts,
and dropping finished rows from the batch so compute shrinks. (And PEFT's prefix `generate` is
known to be broken on this stack: see DESIGN.md.)

`score` / `classify` sum the log-probs of candidate completions in one batched forward with a
`FrozenPrefixCache`, for classification-style tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.ml.kvcache import KV, FrozenPrefixCache, batch_prefixes, positions_from_mask, prefix_generation_cache

# Prompt tokens decoded together with the completion, so that tokenizers whose pieces depend on
# what precedes them (SentencePiece's leading space) give the same text as a full decode.
_DETOK_CONTEXT = 5


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    prefix: KV | None = None
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to return per token; None = no logprobs
    ignore_eos: bool = False  # keep going past EOS (benchmarks want exactly max_tokens tokens)


@dataclass
class TokenLogprob:
    """Log-probabilities under the model's raw distribution (before temperature/top-k/top-p)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token_id, token, logprob), most likely first


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, EOS included when it ended the row
    finish_reason: str  # "stop" (EOS or stop string), "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


OnToken = Callable[[int, int, str], None]  # (row, token_id, text_delta)
ShouldAbort = Callable[[int], bool]  # (row) -> abort?


# ---------------------------------------------------------------------------------------------
# context limits


def max_context(base) -> int:
    """Positions the base can address: prefix + prompt + completion must fit in this."""
    return int(base.geometry.max_positions)


def prefix_length(prefix: KV | None) -> int:
    return 0 if prefix is None else int(prefix[0][0].shape[1])


def check_context(base, prompt_tokens: int, prefix_tokens: int, max_tokens: int) -> None:
    limit = max_context(base)
    total = prompt_tokens + prefix_tokens + max_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + prefix ({prefix_tokens} virtual tokens) + max_tokens "
            f"({max_tokens}) = {total} exceeds the model's context of {limit} positions"
        )


# ---------------------------------------------------------------------------------------------
# text: incremental detokenisation and stop strings


class IncrementalDetokenizer:
    """Turns a token stream into text deltas whose concatenation is the decoded text.

    Decodes a short window (a few already-emitted tokens plus the new ones) rather than the whole
    sequence, and holds back a delta while it ends in '\\ufffd' (a multi-byte character split
    across tokens) until the character completes. The TGI/vLLM scheme.
    """

    def __init__(self, tokenizer, context_ids: list[int] | tuple = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)[-_DETOK_CONTEXT:]
        self.prefix_offset = 0  # window start: context for the decoder, already emitted
        self.read_offset = len(self.ids)  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: windowed decodes must concatenate to the same text as one full decode.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _delta(self, force: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        # A character is at most 4 bytes, so at most 4 tokens: a '\ufffd' that 4 held-back tokens
        # did not complete is real garbage; emit it rather than hold text (and grow the window) forever.
        complete = not new_text.endswith("\ufffd") or len(self.ids) - self.read_offset >= 4
        if force or (len(new_text) > len(prefix_text) and complete):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(force=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as '\\ufffd')."""
        return self._delta(force=True) if self.read_offset < len(self.ids) else ""


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in `text[start:]`'s matches, or None."""
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper start of some stop string.

    That tail must not be streamed yet: the next tokens may complete the stop string, and a stop
    string is never part of the returned text.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# ---------------------------------------------------------------------------------------------
# sampling


def sample_token(logits: torch.Tensor, req: GenerationRequest, generator: torch.Generator | None) -> int:
    """One token from a row's `[V]` float logits under the row's own settings and generator."""
    if req.temperature <= 0 or req.top_k == 1:
        return int(logits.argmax())
    x = logits / req.temperature
    if req.top_k > 0 and req.top_k < x.shape[-1]:
        kth = torch.topk(x, req.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens strictly more likely already reach top_p (the top one stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= req.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_logprobs(tokenizer, logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    lp = logits.log_softmax(-1)
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    top = []
    if k > 0:
        vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
        top = [(int(i), text(int(i)), float(v)) for v, i in zip(vals.tolist(), ids.tolist())]
    return TokenLogprob(int(token_id), text(int(token_id)), float(lp[token_id]), top)


def eos_token_ids(base) -> set[int]:
    ids: set[int] = set()
    for src in (
        getattr(base.tokenizer, "eos_token_id", None),
        getattr(getattr(base.model, "generation_config", None), "eos_token_id", None),
        getattr(base.model.config, "eos_token_id", None),
    ):
        if src is None:
            continue
        ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
    return ids


def _pad_id(base) -> int:
    pad = getattr(base.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(base.tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _prefix_on(prefix: KV | None, dtype, device) -> KV | None:
    if prefix is None:
        return None
    return [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in prefix]


def _same_prefixes(prefixes: list[KV | None], dtype, device) -> list[KV | None]:
    """Move prefixes to the model, keeping shared ones shared (batch_prefixes expands those)."""
    moved: dict[int, KV | None] = {}
    return [moved.setdefault(id(p), _prefix_on(p, dtype, device)) for p in prefixes]


# ---------------------------------------------------------------------------------------------
# generation


class _Row:
    """Per-request decoding state."""

    def __init__(self, index: int, req: GenerationRequest, tokenizer, device):
        self.index, self.req = index, req
        self.token_ids: list[int] = []
        self.text = ""  # decoded completion so far (cut at a stop string)
        self.sent = 0  # characters of `text` already streamed
        self.finish: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids)
        self.stops = [s for s in req.stop if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.generator = None
        if req.temperature > 0 and req.top_k != 1:
            # One generator per request: its samples do not depend on its batch neighbours.
            self.generator = torch.Generator(device=device)
            if req.seed is not None:
                self.generator.manual_seed(int(req.seed))
            else:
                self.generator.seed()

    def advance(self, token_id: int, is_eos: bool) -> str:
        """Take one token; returns the text that may be streamed now."""
        self.token_ids.append(token_id)
        at_length = len(self.token_ids) >= self.req.max_tokens
        before = len(self.text)
        self.text += self.detok.step(token_id)
        if is_eos or at_length:
            self.text += self.detok.flush()
        cut = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1)) if self.stops else None
        if cut is not None:
            self.text = self.text[:cut]
            self.finish = "stop"
        elif is_eos:
            self.finish = "stop"
        elif at_length:
            self.finish = "length"
        visible = len(self.text) if self.finish else len(self.text) - partial_stop_len(self.text, self.stops)
        delta = self.text[self.sent : visible] if visible > self.sent else ""
        self.sent = max(self.sent, visible)
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=self.finish or "abort",
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=len(self.token_ids),
            logprobs=self.logprobs,
        )


def _trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading slots that no remaining row attends to (left when long rows finished).

    Dropping fully-masked columns changes neither attention nor `cumsum(mask)` positions.
    """
    first = int(mask.any(0).int().argmax())
    if first == 0 or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return mask[:, first:]


def generate(
    base,
    requests: list[GenerationRequest],
    on_token: OnToken | None = None,
    should_abort: ShouldAbort | None = None,
) -> list[GenerationResult]:
    """Run all requests in shared forward passes; results in request order.

    `on_token(row, token_id, text_delta)` is called for every generated token; `text_delta` may
    be "" while text is held back (an incomplete character, or a possible start of a stop string).
    `should_abort(row)` is checked before the prefill and after each of the row's tokens; an aborted
    row ends with finish_reason "abort" and leaves the batch.
    """
    model, tokenizer, device = base.model, base.tokenizer, base.device
    dtype = _model_dtype(model)
    for req in requests:
        if not req.prompt_ids:
            raise ValueError("prompt must have at least one token")
        if req.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {req.max_tokens}")
        check_context(base, len(req.prompt_ids), prefix_length(req.prefix), req.max_tokens)
    rows = [_Row(i, r, tokenizer, device) for i, r in enumerate(requests)]
    for row in rows:
        if row.req.max_tokens == 0:
            row.finish = "length"
        elif should_abort is not None and should_abort(row.index):
            row.finish = "abort"
    active = [row for row in rows if row.finish is None]
    if not active:
        return [row.result() for row in rows]

    eos = eos_token_ids(base)
    with torch.inference_mode():
        # Prefill: left-padded prompts after right-aligned prefixes.
        L = max(len(r.req.prompt_ids) for r in active)
        pad = _pad_id(base)
        ids = torch.tensor([[pad] * (L - len(r.req.prompt_ids)) + list(r.req.prompt_ids) for r in active], device=device)
        tmask = torch.tensor([[0] * (L - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in active], device=device)
        prefixes = _same_prefixes([r.req.prefix for r in active], dtype, device)
        kv, pmask = batch_prefixes(prefixes, base.geometry, dtype, device)
        mask = torch.cat([pmask, tmask], 1)
        cache = prefix_generation_cache(kv) if pmask.shape[1] else DynamicCache()
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, L),
            cache=cache, use_cache=True, logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()

        while True:
            greedy = logits.argmax(-1).tolist()  # one sync for all greedy rows
            keep, next_ids = [], []
            for j, row in enumerate(active):
                req = row.req
                tok = greedy[j] if row.generator is None else sample_token(logits[j], req, row.generator)
                if row.logprobs is not None:
                    row.logprobs.append(_token_logprobs(tokenizer, logits[j], tok, req.logprobs))
                delta = row.advance(tok, tok in eos and not req.ignore_eos)
                if on_token is not None:
                    on_token(row.index, tok, delta)
                # Checked right before the row's next forward, so an aborted row costs no more compute.
                if row.finish is None and should_abort is not None and should_abort(row.index):
                    row.finish = "abort"
                if row.finish is None:
                    keep.append(j)
                    next_ids.append(tok)
            if not keep:
                break
            if len(keep) < len(active):
                # Finished/aborted rows leave the batch: later steps only compute the live rows.
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask = _trim_left(cache, mask[idx])
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
            out = model(
                input_ids=torch.tensor(next_ids, device=device)[:, None], attention_mask=mask,
                position_ids=positions_from_mask(mask, 1), cache=cache, use_cache=True,
            )
            logits = out.logits[:, -1].float()
    return [row.result() for row in rows]


# ---------------------------------------------------------------------------------------------
# scoring


def score(base, prompt_ids: list[int], candidates: list[list[int]], prefix: KV | None = None) -> list[float]:
    """Sum of log-probs of each candidate completion after `prompt_ids`, under `prefix`.

    One batched forward with a `FrozenPrefixCache`; rows are prompt+candidate, left-padded.
    """
    if not prompt_ids:
        raise ValueError("prompt must have at least one token")
    if not candidates:
        return []
    model, device = base.model, base.device
    dtype = _model_dtype(model)
    seqs = [list(prompt_ids) + list(c) for c in candidates]
    L = max(len(s) for s in seqs)
    P = prefix_length(prefix)
    check_context(base, L, P, 0)
    n, longest = len(seqs), max(len(c) for c in candidates)
    if longest == 0:
        return [0.0] * n
    pad = _pad_id(base)
    ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs], device=device)
    tmask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device)
    prefix = _prefix_on(prefix, dtype, device)
    with torch.inference_mode():
        kv, pmask = batch_prefixes([prefix] * n, base.geometry, dtype, device)
        mask = torch.cat([pmask, tmask], 1)
        cache = FrozenPrefixCache(kv) if P else None
        # Only the last longest+1 positions predict candidate tokens.
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, L),
            cache=cache, logits_to_keep=longest + 1,
        )
        lp = out.logits[:, :-1].float().log_softmax(-1)  # [n, longest, V]; column t predicts ids[:, L-longest+t]
        targets = ids[:, L - longest :]
        tok_lp = lp.gather(-1, targets[..., None])[..., 0]
        scores = []
        for i, c in enumerate(candidates):
            scores.append(float(tok_lp[i, longest - len(c) :].sum()) if c else 0.0)
    return scores


def classify(
    base, prompt_ids: list[int], labels_ids: list[list[int]], prefix: KV | None = None
) -> list[tuple[float, float]]:
    """Per label: (summed log-prob of the label, probability normalised over the labels)."""
    lps = score(base, prompt_ids, labels_ids, prefix)
    if not lps:
        return []
    m = max(lps)
    z = sum(math.exp(x - m) for x in lps)
    return [(x, math.exp(x - m) / z) for x in lps]
