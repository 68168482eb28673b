"""Mixed-prefix generation and scoring over one frozen base.

`generate` runs a batch of requests, each with its own prefix (or none), through shared forward
passes, following THE rule of `kvcache.py`: prefixes right-aligned in P_max cache slots, prompts
left-padded, mask `[prefix slots | tokens]`, position ids from `positions_from_mask`. So every row
computes exactly what it computes alone.

`DecodeBatch` is the continuous-batching core under `generate`: rows join between decode steps
(prefilled on their own, then merged into the running cache with left padding, which changes no
row's positions) and leave as they finish. The serving engine drives it step by step.

We write our own decode loop rather than calling HF `generate` because we need, per row: its own
sampling settings and seeded generator, stop strings, streaming with correct text deltas, aborts,
dropping finished rows from the batch so compute shrinks, and rows joining a running batch. (And
with peft 0.21, PEFT's `generate` with a trained prefix gives a short fragment where a step-by-step
greedy loop over the same forward gives a fluent sentence.)

`score` / `classify` sum the log-probs of candidate completions, for classification-style tasks:
the prompt is prefilled once, and only multi-token candidates run a second, shared forward.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.ml.kvcache import (
    KV,
    GenerationCache,
    GrowingLayer,
    batch_prefixes,
    keeps_logits_by_mask,
    positions_from_mask,
)

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
    # OpenAI's definitions: before choosing each token, logits[j] -= c[j] * frequency_penalty +
    # (c[j] > 0) * presence_penalty, c[j] the times this row has generated token j so far (the
    # prompt does not count), and logits[j] += logit_bias[j]
    presence_penalty: float = 0.0  # -2 .. 2
    frequency_penalty: float = 0.0  # -2 .. 2
    logit_bias: dict[int, float] | None = None  # token id -> -100 .. 100

    @property
    def shapes_logits(self) -> bool:
        """Whether this row's logits change before it chooses (penalties or a bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class TokenLogprob:
    """Log-probabilities under the model's raw distribution: before temperature, top-k, top-p,
    presence/frequency penalties and logit_bias, which change what is chosen, not what is reported."""

    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token (echo): nothing predicts it
    top: list[tuple[int, str, float]] | None  # (token_id, token, logprob), most likely first


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, EOS included when it ended the row
    finish_reason: str  # "stop" (EOS or stop string), "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class GenerationFailedError(RuntimeError):
    """One row's decoding went bad (non-finite logits, a sampling fault, a token outside the
    vocabulary, a forward that fails for it alone). The row ends with this error; its neighbours
    in the batch go on as if it had never been there."""


class SamplingError(ValueError):
    """Some row of a sampling call has no valid distribution to draw from."""


# Below this temperature a row decodes greedily: logits / T overflows float32 for tiny T (1e-38
# with logits ~1e3), and at 1e-5 sampling already picks the top token but for ties.
MIN_TEMPERATURE = 1e-5
# The smallest top_p accepted: at 1e-8 the nucleus still holds the top token in float32; below
# about 1e-45 p rounds to 0 and the nucleus is empty.
MIN_TOP_P = 1e-8


# (row, token_id, text_delta, logprobs): `logprobs` lists the TokenLogprobs of the tokens whose text
# `text_delta` releases (see `_Row.advance`), or None when the row asked for no logprobs
OnToken = Callable[[int, int, str, "list[TokenLogprob] | None"], None]
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


def _backend_decoder(tokenizer):
    """The Rust tokenizer's `decode` where transformers' wrapper adds nothing to it but clean-up
    (which we turn off): 2 instead of 7 us a call, and every generated token costs two calls."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer.backend_tokenizer.decode
    return None


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
        self._backend_decode = _backend_decoder(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=True)
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


def greedy_tokens(logits: torch.Tensor):
    """`(values, indices)`: the most likely token of each row (the first one on ties, like
    `argmax`) and its logit, NaN where the row has a NaN, so one pass also finds the rows whose
    logits went bad. `max` rather than `argmax`: it is several times faster on the CPU
    (docs/BENCHMARKS.md)."""
    return logits.max(-1)


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One uniform in [0, 1) from each row's own generator: what `sample_tokens` turns into a token.
    Drawn before sampling, so that a sampling step retried row by row (after one row's fault)
    reuses the same draws and no row's random stream moves."""
    return torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])


def sample_tokens(logits: torch.Tensor, requests: list[GenerationRequest], uniforms: torch.Tensor) -> list[int]:
    """One token for each row of `[R, V]` float logits, under that row's temperature, top_k and
    top_p, by inverse-CDF sampling at the row's uniform (`draw_uniforms`).

    Vectorised over the rows: per-row `torch.multinomial` cost ~200 us and a top_p sort ~380 us a
    row on CPU, which made a 32-row sampled decode step 2-4x the cost of its forward. A row's token
    still depends only on its own logits, settings and uniform, never on its batch neighbours.

    Raises SamplingError when a row's distribution is not a distribution (NaN, Inf or no mass
    left after its filters), rather than returning an index past the vocabulary.
    """
    R, V = logits.shape
    x = logits / torch.tensor([r.temperature for r in requests], dtype=logits.dtype, device=logits.device)[:, None]
    ks = torch.tensor([r.top_k if 0 < r.top_k < V else 0 for r in requests], device=logits.device)
    if bool(ks.any()):
        top = torch.topk(x, int(ks.max()), dim=-1).values  # sorted: a row's k-th value is the same for any larger k
        kth = top.gather(1, (ks - 1).clamp(min=0)[:, None])
        x = x.masked_fill((x < kth) & (ks > 0)[:, None], float("-inf"))
    nucleus = [i for i, r in enumerate(requests) if r.top_p < 1.0]
    if nucleus:
        rows = torch.tensor(nucleus, device=logits.device)
        ps = torch.tensor([requests[i].top_p for i in nucleus], dtype=logits.dtype, device=logits.device)
        x[rows] = x[rows].masked_fill(~_nucleus(x[rows].softmax(-1).float(), ps.float()), float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        raise SamplingError(f"{int(bad.sum())} of {R} rows have no valid next-token distribution")
    u = uniforms.to(device=cdf.device, dtype=cdf.dtype)
    ids = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    # u * total can round up to the total: then take the last token of positive probability (the
    # first where the CDF reaches its total)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())[:, 0]
    return torch.minimum(ids, last).tolist()


def _nucleus(probs: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Top-p masks of `[R, V]` float probabilities: keep a token while the tokens ranked above it
    hold less than p (the top one always stays).

    A full sort costs ~270 us a row on CPU (8,192 entries). Where the top k already hold p, the
    kept set lies among them, so a top-64 settles peaked rows, a top-1024 most others, and only
    rows flatter than that are sorted. Which stage settles a row depends on that row alone."""
    V = probs.shape[-1]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows = torch.arange(len(probs), device=probs.device)
    for k in sorted({min(64, V), min(1024, V), V}):
        sub, p = probs[rows], ps[rows]
        vals, idx = sub.topk(k, dim=-1) if k < V else sub.sort(-1, descending=True)
        before = vals.cumsum(-1) - vals  # the mass ranked above each
        settled = (before[:, -1] + vals[:, -1] >= p) | (k >= V)
        keep[rows[settled]] = torch.zeros_like(sub[settled], dtype=torch.bool).scatter(
            1, idx[settled], before[settled] < p[settled, None])
        rows = rows[~settled]
        if not len(rows):
            break
    return keep


def token_logprobs(tokenizer, logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Per row of `[R, V]` float logits: the log-probability of its chosen token and its `ks[i]`
    most likely alternatives, from one batched `log_softmax` and one `topk` for all rows."""
    lp = logits.log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device)[:, None])[:, 0].tolist()
    kmax = min(max(ks, default=0), lp.shape[-1])
    vals, ids = lp.topk(kmax, dim=-1) if kmax > 0 else (lp[:, :0], lp[:, :0].long())
    vals, ids = vals.tolist(), ids.tolist()

    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [TokenLogprob(int(t), text(int(t)), chosen[i],
                         [(j, text(j), v) for v, j in zip(vals[i][: ks[i]], ids[i][: ks[i]], strict=False)])
            for i, t in enumerate(token_ids)]


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


def _embeddable_ids(model) -> int:
    """How many token ids the model can embed (its logits may cover more: a padded vocabulary)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(embeddings, "num_embeddings", None)
    return int(n if n is not None else model.config.vocab_size)


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
# next-token logits

_SPLIT_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_head(model):
    """`(backbone, head)` when `model(...)` is exactly `head(backbone(...).last_hidden_state)` and
    the head is a plain linear layer, else None. Checked once per model on a short input, so an
    architecture that scales or soft-caps its logits keeps the model's own forward."""
    if model not in _SPLIT_HEADS:
        _SPLIT_HEADS[model] = _check_split_head(model)
    return _SPLIT_HEADS[model]


@torch.inference_mode()
def _check_split_head(model):
    backbone = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is model or type(head) is not torch.nn.Linear:
        return None
    ids = torch.arange(1, 4, device=head.weight.device)[None] % head.weight.shape[0]
    try:
        expected = model(input_ids=ids, use_cache=False).logits
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
    except Exception:  # a backbone that wants other inputs: keep the model's forward
        return None
    # the head's own call on the same states must give the model's logits bit for bit (in any
    # dtype); W·Hᵀ then differs from them by rounding only
    return (backbone, head) if torch.equal(head(hidden), expected) else None


def vocab_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """Float `[rows, vocab]` logits of `[rows, hidden]` states, computed as W·Hᵀ, transposed.

    The same products as the model's H·Wᵀ, but MKL runs `[V, d] x [d, rows]` faster than
    `[rows, d] x [d, V]` at many rows, and about as fast at 1 row (`bench.projection`). The
    vocabulary projection is the largest matmul of a decode step on a small base."""
    logits = (head.weight @ hidden.t()).t()
    if head.bias is not None:
        logits = logits + head.bias
    return logits.to(torch.float32, memory_format=torch.contiguous_format)


def last_logits(model, **inputs) -> torch.Tensor:
    """Float `[rows, vocab]` next-token logits at the last position of each row of `inputs`."""
    parts = split_head(model)
    if parts is not None:
        backbone, head = parts
        return vocab_logits(head, backbone(**inputs).last_hidden_state[:, -1])
    if keeps_logits_by_mask(model):
        # a boolean mask gathers the last positions into one contiguous [rows, hidden] block, so
        # the vocabulary projection is one matmul; `logits_to_keep=1` slices a strided view, which
        # torch turns into a batched matmul over a copied weight
        keep = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool, device=inputs["input_ids"].device)
        keep[:, -1] = True
        return model(**inputs, logits_to_keep=keep).logits.float()
    return model(**inputs, logits_to_keep=1).logits[:, -1].float()


# ---------------------------------------------------------------------------------------------
# generation


class _Row:
    """Per-request decoding state. `key` is the caller's name for the row (its index in `generate`)."""

    def __init__(self, key, req: GenerationRequest, tokenizer, device):
        self.key, self.req = key, req
        self.token_ids: list[int] = []
        self.text = ""  # decoded completion so far (cut at a stop string)
        self.sent = 0  # characters of `text` already streamed
        self.finish: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids)
        # logprobs of tokens whose text is not streamed yet, each with the offset in `text` where
        # its text starts; `released` holds those the last `advance` let go
        self._unreleased: list[tuple[int, TokenLogprob]] = []
        self.released: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        self.stops = [s for s in req.stop if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        # rows with penalties or a bias: what they add to their logits, `[vocab]`, built at their
        # first step (`logit_offset`) and updated with each token they take; None for the others,
        # which pay nothing for it
        self.offset: torch.Tensor | None = None
        self._seen: set[int] = set()
        self.generator = None
        if req.temperature >= MIN_TEMPERATURE and req.top_k != 1:
            # One generator per request: its samples do not depend on its batch neighbours.
            self.generator = torch.Generator(device=device)
            if req.seed is not None:
                self.generator.manual_seed(int(req.seed))
            else:
                self.generator.seed()

    def logit_offset(self, vocab: int, device) -> torch.Tensor:
        """What this row adds to its next-token logits: its logit_bias, less its penalties on the
        tokens it has generated so far (OpenAI's definitions, `GenerationRequest`)."""
        if self.offset is None:
            self.offset = torch.zeros(vocab, dtype=torch.float32, device=device)
            for tok, bias in (self.req.logit_bias or {}).items():
                self.offset[int(tok)] += float(bias)
        return self.offset

    def advance(self, token_id: int, is_eos: bool) -> str:
        """Take one token; returns the text that may be streamed now."""
        self.token_ids.append(token_id)
        if self.offset is not None and (self.req.frequency_penalty or self.req.presence_penalty):
            # one more occurrence of token_id: its frequency penalty again, its presence penalty once
            first = token_id not in self._seen
            self._seen.add(token_id)
            self.offset[token_id] -= self.req.frequency_penalty + (self.req.presence_penalty if first else 0.0)
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
        if self.released is not None:
            self._release(before)
        return delta

    def _release(self, start: int) -> None:
        """The logprobs that go with this token's delta: a token's goes out with the first text of
        its own that is streamed, so one held back (part of a multi-byte character, of a possible
        stop string) goes with the delta that releases it; the last delta takes all that are left
        (EOS, a stop string's own tokens)."""
        if len(self.logprobs) == len(self.token_ids):  # this token was scored (DecodeBatch.step)
            self._unreleased.append((start, self.logprobs[-1]))
        if self.finish:
            go = len(self._unreleased)
        else:
            go = next((i for i, (at, _) in enumerate(self._unreleased) if at >= self.sent), len(self._unreleased))
        self.released = [lp for _, lp in self._unreleased[:go]]
        del self._unreleased[:go]

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=self.token_ids,
            finish_reason=self.finish or "abort",
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=len(self.token_ids),
            logprobs=self.logprobs,
        )


def _empty_result(req: GenerationRequest, finish: str) -> GenerationResult:
    """The result of a row that never ran (aborted before its prefill, or max_tokens 0)."""
    return GenerationResult("", [], finish, len(req.prompt_ids), 0, [] if req.logprobs is not None else None)


def check_request(base, req: GenerationRequest) -> None:
    """Raise ValueError for a request that cannot run on `base`."""
    if not req.prompt_ids:
        raise ValueError("prompt must have at least one token")
    if req.max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {req.max_tokens}")
    if not req.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {req.temperature}")
    if not MIN_TOP_P <= req.top_p <= 1:
        raise ValueError(f"top_p must be between {MIN_TOP_P} and 1, got {req.top_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(req, name) <= 2:
            raise ValueError(f"{name} must be between -2 and 2, got {getattr(req, name)}")
    if req.logit_bias:
        vocab = _embeddable_ids(base.model)
        for tok, bias in req.logit_bias.items():
            if not 0 <= int(tok) < vocab:
                raise ValueError(f"logit_bias has token id {tok}, outside the vocabulary of {vocab}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {tok}")
    check_context(base, len(req.prompt_ids), prefix_length(req.prefix), req.max_tokens)


# A prefill forward pads every prompt to the longest one. Rows are split into groups of similar
# length when the padding would exceed both this share of the real tokens and this many tokens
# (below that, one more forward's fixed cost outweighs the padding it saves).
PAD_WASTE_SHARE = 0.25
PAD_WASTE_MIN_TOKENS = 256


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of prompts to prefill together, shortest first: groups of similar lengths, so that
    one long prompt does not pad a batch of short ones to its length."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        padding = (len(group) + 1) * n - (real + n)  # n is the group's new longest prompt
        if group and padding > max(PAD_WASTE_SHARE * (real + n), PAD_WASTE_MIN_TOKENS):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    if group:
        groups.append(group)
    return groups


def _plain_layers(cache) -> bool:
    return all(type(layer) is GrowingLayer for layer in cache.layers)


def _trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading slots that no remaining row attends to (left when long rows finished).

    Dropping fully-masked columns changes neither attention nor `cumsum(mask)` positions.
    """
    first = int(mask.any(0).int().argmax())
    if first == 0 or not _plain_layers(cache):
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return mask[:, first:]


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def _merge(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (in place); returns the merged mask.

    The shorter side is left-padded along time with zero keys/values and mask 0: a masked slot
    gets no attention weight and adds nothing to `cumsum(mask)`, so every row keeps its positions
    (rotary is already applied to cached keys) and computes what it computed before.
    """
    if not (_plain_layers(cache) and _plain_layers(new_cache)):
        raise RuntimeError("rows can only join a batch whose cache layers are GrowingLayers")
    T, T_new = mask.shape[1], new_mask.shape[1]
    T_max = max(T, T_new)
    for layer, new in zip(cache.layers, new_cache.layers, strict=False):
        layer.keys = torch.cat([_left_pad(layer.keys, T_max - T, 2), _left_pad(new.keys, T_max - T_new, 2)], 0)
        layer.values = torch.cat([_left_pad(layer.values, T_max - T, 2), _left_pad(new.values, T_max - T_new, 2)], 0)
    return torch.cat([_left_pad(mask, T_max - T, 1), _left_pad(new_mask, T_max - T_new, 1)], 0)


class DecodeBatch:
    """The live rows of a continuous batch over one base: their KV cache, attention mask and
    next-token logits.

    `add(requests, keys)` prefills new rows (their own prefixes, THE rule of `kvcache.py`) and
    merges them into the running cache, so rows can join between decode steps; `step()` samples
    one token for every live row and runs one decode forward for the rows still going. Finished
    and dropped rows leave the batch at once, so its compute follows the live rows.
    """

    def __init__(self, base):
        self.base = base
        self.dtype = _model_dtype(base.model)
        self.eos = eos_token_ids(base)
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, slots]: prefix slots and tokens, 0 = padding
        self.logits: torch.Tensor | None = None  # [rows, vocab] float: each row's next-token logits
        self.vocab = _embeddable_ids(base.model)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list:
        return [row.key for row in self.rows]

    @torch.inference_mode()
    def add(self, requests: list[GenerationRequest], keys: list | None = None) -> list[tuple[object, GenerationResult]]:
        """Prefill `requests` and let them join. Checks every request first (ValueError, nothing
        added). Returns (key, result) for rows that are finished without decoding (max_tokens 0)."""
        keys = list(range(len(self.rows), len(self.rows) + len(requests))) if keys is None else list(keys)
        for req in requests:
            check_request(self.base, req)
        done = [(k, _empty_result(r, "length")) for k, r in zip(keys, requests, strict=False) if r.max_tokens == 0]
        rows = [_Row(k, r, self.base.tokenizer, self.base.device)
                for k, r in zip(keys, requests, strict=True) if r.max_tokens > 0]
        for group in prefill_groups([len(r.req.prompt_ids) for r in rows]):
            group_rows = [rows[i] for i in group]
            cache, mask, logits = self._prefill(group_rows)
            if not self.rows:
                self.cache, self.mask, self.logits = cache, mask, logits
            else:
                self.mask = _merge(self.cache, self.mask, cache, mask)
                self.logits = torch.cat([self.logits, logits], 0)
            self.rows += group_rows
        return done

    def _prefill(self, rows: list[_Row]):
        """(cache, mask, last logits) of `rows`. Rows with the same prompt and the same prefix
        object (the `n` choices of one API request, or one prompt sent many times) are computed
        once: their keys/values and logits are copies of that one row's."""
        first: dict[tuple, int] = {}
        which = [first.setdefault((tuple(r.req.prompt_ids), id(r.req.prefix)), i) for i, r in enumerate(rows)]
        if len(first) == len(rows):
            return self._prefill_distinct(rows)
        distinct = sorted(first.values())
        cache, mask, logits = self._prefill_distinct([rows[i] for i in distinct])
        position = {row: k for k, row in enumerate(distinct)}
        idx = torch.tensor([position[w] for w in which], device=mask.device)
        cache.batch_select_indices(idx)  # repeated indices: each copy gets its own tensors
        return cache, mask[idx], logits[idx]

    def _prefill_distinct(self, rows: list[_Row]):
        """Left-padded prompts after right-aligned prefixes: (cache, mask, last logits)."""
        device = self.base.device
        L = max(len(r.req.prompt_ids) for r in rows)
        pad = _pad_id(self.base)
        ids = torch.tensor([[pad] * (L - len(r.req.prompt_ids)) + list(r.req.prompt_ids) for r in rows], device=device)
        tmask = torch.tensor(
            [[0] * (L - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in rows], device=device
        )
        prefixes = _same_prefixes([r.req.prefix for r in rows], self.dtype, device)
        kv, pmask = batch_prefixes(prefixes, self.base.geometry, self.dtype, device)
        mask = torch.cat([pmask, tmask], 1)
        cache = GenerationCache(kv if pmask.shape[1] else None, reserve=mask.shape[1])
        logits = last_logits(
            self.base.model,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask, L),
            cache=cache,
            use_cache=True,
        )
        return cache, mask, logits

    @torch.inference_mode()
    def drop(self, keys) -> list[tuple[object, GenerationResult]]:
        """Remove rows (finish_reason "abort") without computing anything for them."""
        keys = set(keys)
        gone = [row for row in self.rows if row.key in keys]
        for row in gone:
            row.finish = row.finish or "abort"
        self._keep([j for j, row in enumerate(self.rows) if row.key not in keys])
        return [(row.key, row.result()) for row in gone]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = _trim_left(self.cache, self.mask[idx])
        self.logits = self.logits[idx]
        self.rows = [self.rows[j] for j in keep]

    @torch.inference_mode()
    def step(
        self, on_token: OnToken | None = None, should_abort: ShouldAbort | None = None
    ) -> list[tuple[object, object]]:
        """One token for every live row, then one decode forward for the rows that go on.

        `on_token(key, token_id, text_delta, logprobs)` is called for each token (`logprobs`: the
        TokenLogprobs that go with `text_delta`, see `_Row.advance`; None when the row asked for
        none); `should_abort(key)` right
        after it, so an aborted row costs no more compute. Returns (key, result) of the rows
        that finished in this step; a row whose decoding went bad finishes with a
        GenerationFailedError as its result, and the others go on exactly as without it."""
        if not self.rows:
            return []
        tokens, failed = self._next_tokens()
        scored = [j for j, row in enumerate(self.rows) if row.logprobs is not None and j not in failed]
        if scored:
            for j, entry in zip(
                scored,
                token_logprobs(
                    self.base.tokenizer,
                    self.logits[scored],
                    [tokens[j] for j in scored],
                    [self.rows[j].req.logprobs for j in scored],
                ),
                strict=False,
            ):
                self.rows[j].logprobs.append(entry)
        keep, next_ids, done = [], [], []
        for j, row in enumerate(self.rows):
            if j in failed:
                row.finish = "error"
                done.append((row.key, failed[j]))
                continue
            tok = tokens[j]
            delta = row.advance(tok, tok in self.eos and not row.req.ignore_eos)
            if on_token is not None:
                on_token(row.key, tok, delta, row.released)
            if row.finish is None and should_abort is not None and should_abort(row.key):
                row.finish = "abort"
            if row.finish is None:
                keep.append(j)
                next_ids.append(tok)
            else:
                done.append((row.key, row.result()))
        self._keep(keep)
        if self.rows:
            done += self._decode(next_ids)
        return done

    def _next_tokens(self) -> tuple[list[int], dict[int, GenerationFailedError]]:
        """Each row's next token, and the rows (by index) that cannot have one: logits that are
        not finite (a hostile adapter, an overflow), a sampling fault, a token id the model cannot
        embed. A sampling call that fails is retried row by row with the same uniforms, so that
        only the rows at fault fail and every other row draws what it would have drawn."""
        best = greedy_tokens(self.logits)
        tokens = best.indices.tolist()
        failed = {
            j: GenerationFailedError(
                "the next-token logits are not finite (NaN or Inf); the adapter's values may be corrupt"
            )
            for j, ok in enumerate(torch.isfinite(best.values).tolist())
            if not ok
        }
        # rows with penalties or a bias choose from their own shaped logits: a copy of their rows
        # alone, so the other rows' path (and cost) is what it is without them
        shaped = [j for j, row in enumerate(self.rows) if row.req.shapes_logits and j not in failed]
        if shaped:
            V, device = self.logits.shape[-1], self.logits.device
            adjusted = self.logits[shaped] + torch.stack([self.rows[j].logit_offset(V, device) for j in shaped])
            shaped_logits = dict(zip(shaped, adjusted, strict=False))
            greedy = [i for i, j in enumerate(shaped) if self.rows[j].generator is None]
            if greedy:
                for i, tok in zip(greedy, greedy_tokens(adjusted[greedy]).indices.tolist(), strict=False):
                    tokens[shaped[i]] = tok
        sampled = [j for j, row in enumerate(self.rows) if row.generator is not None and j not in failed]
        if sampled:
            uniforms = draw_uniforms([self.rows[j].generator for j in sampled])
            x = self.logits[sampled]  # a copy: the shaped rows' own logits go in its rows
            if shaped:
                for i, j in enumerate(sampled):
                    if j in shaped_logits:
                        x[i] = shaped_logits[j]
            try:
                picks = dict(
                    zip(sampled, sample_tokens(x, [self.rows[j].req for j in sampled], uniforms), strict=False)
                )
            except Exception:  # noqa: BLE001 - find the rows at fault
                picks = {}
                for i, j in enumerate(sampled):
                    try:
                        picks[j] = sample_tokens(x[i : i + 1], [self.rows[j].req], uniforms[i : i + 1])[0]
                    except Exception as exc:  # noqa: BLE001
                        failed[j] = GenerationFailedError(f"sampling failed: {type(exc).__name__}: {exc}")
            for j, tok in picks.items():
                tokens[j] = tok
        for j, tok in enumerate(tokens):
            if j not in failed and not 0 <= tok < self.vocab:
                failed[j] = GenerationFailedError(f"token id {tok} is outside the model's vocabulary of {self.vocab}")
        return tokens, failed

    def _decode(self, next_ids: list[int]) -> list[tuple[object, GenerationFailedError]]:
        """The decode forward of the live rows, each fed its token. When it raises, the cache is
        put back as it was and each row is run alone to find those it fails for: they leave with
        the error, and the forward runs again without them. Returns (key, error) of those rows."""
        lengths = [layer.keys.shape[2] for layer in self.cache.layers]
        try:
            self.logits = self._forward(self.cache, self.mask, next_ids)
            return []
        except Exception as exc:  # noqa: BLE001
            if len(self.rows) == 1 or not _plain_layers(self.cache):
                raise
            first_error = exc
        self._restore(lengths)
        bad: dict[int, Exception] = {}
        for j in range(len(self.rows)):
            cache = GenerationCache(
                [(layer.keys[j : j + 1].clone(), layer.values[j : j + 1].clone()) for layer in self.cache.layers]
            )
            try:
                self._forward(cache, self.mask[j : j + 1], next_ids[j : j + 1])
            except Exception as exc:  # noqa: BLE001
                bad[j] = exc
        if not bad:  # no row fails alone: the batch as a whole does (out of memory, ...)
            raise first_error
        failed = [
            (self.rows[j].key, GenerationFailedError(f"the decode step failed: {type(e).__name__}: {e}"))
            for j, e in bad.items()
        ]
        for j in bad:
            self.rows[j].finish = "error"
        keep = [j for j in range(len(self.rows)) if j not in bad]
        self._keep(keep)
        if self.rows:
            self.logits = self._forward(self.cache, self.mask, [next_ids[j] for j in keep])
        return failed

    def _forward(self, cache, mask: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
        """Next-token logits after feeding one token per row; `mask` gains the token's slot."""
        mask = torch.cat([mask, mask.new_ones(len(next_ids), 1)], 1)
        logits = last_logits(
            self.base.model,
            input_ids=torch.tensor(next_ids, device=mask.device)[:, None],
            attention_mask=mask,
            position_ids=positions_from_mask(mask, 1),
            cache=cache,
            use_cache=True,
        )
        if cache is self.cache:
            self.mask = mask
        return logits

    def _restore(self, lengths: list[int]) -> None:
        """Cut each layer back to its length before a failed forward (layers it reached grew by a slot)."""
        for layer, n in zip(self.cache.layers, lengths, strict=False):
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]


def generate(
    base,
    requests: list[GenerationRequest],
    on_token: OnToken | None = None,
    should_abort: ShouldAbort | None = None,
) -> list[GenerationResult]:
    """Run all requests in shared forward passes; results in request order.

    `on_token(row, token_id, text_delta, logprobs)` is called for every generated token (`logprobs`:
    see `DecodeBatch.step`); `text_delta` may be "" while text is held back
    (an incomplete character, or a possible start of a stop string).
    `should_abort(row)` is checked before the prefill and after each of the row's tokens; an aborted
    row ends with finish_reason "abort" and leaves the batch.
    """
    for req in requests:
        check_request(base, req)
    results: dict[int, GenerationResult] = {}
    batch = DecodeBatch(base)
    start = []
    for i, req in enumerate(requests):
        if req.max_tokens > 0 and should_abort is not None and should_abort(i):
            results[i] = _empty_result(req, "abort")
        else:
            start.append(i)
    results.update(batch.add([requests[i] for i in start], start))
    while len(batch):
        results.update(batch.step(on_token, should_abort))
    failed = next((r for r in results.values() if isinstance(r, GenerationFailedError)), None)
    if failed is not None:
        raise failed
    return [results[i] for i in range(len(requests))]


# ---------------------------------------------------------------------------------------------
# scoring


def score(base, prompt_ids: list[int], candidates: list[list[int]], prefix: KV | None = None) -> list[float]:
    """Sum of log-probs of each candidate completion after `prompt_ids`, under `prefix`.

    The prompt runs once (a `DecodeBatch` prefill, THE rule of `kvcache.py`): its last logits score
    every candidate's first token, and only candidates of two or more tokens run a second forward,
    all together over the prompt's keys/values repeated per row, their tokens left-padded after the
    prompt (padding in the middle changes no position or attention, as when rows join a batch).
    Before, every candidate re-ran the whole prompt: a 5-label call on a 30-token prompt computed
    it 5 times.
    """
    if not prompt_ids:
        raise ValueError("prompt must have at least one token")
    if not candidates:
        return []
    longest = max(len(c) for c in candidates)
    check_context(base, len(prompt_ids) + longest, prefix_length(prefix), 0)
    if longest == 0:
        return [0.0] * len(candidates)
    with torch.inference_mode():
        prompt = DecodeBatch(base)
        prompt.add([GenerationRequest(list(prompt_ids), prefix=prefix, max_tokens=1)])
        first = prompt.logits[0].log_softmax(-1)
        scores = [float(first[c[0]]) if c else 0.0 for c in candidates]
        multi = [i for i, c in enumerate(candidates) if len(c) > 1]
        if multi:
            device, m = base.device, len(multi)
            # token t of a candidate (all but its last) predicts token t + 1
            inputs = [list(candidates[i][:-1]) for i in multi]
            L = max(len(x) for x in inputs)
            ids = torch.tensor([[_pad_id(base)] * (L - len(x)) + x for x in inputs], device=device)
            tmask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in inputs], device=device)
            targets = torch.tensor(
                [[0] * (L - len(x)) + list(candidates[i][1:]) for i, x in zip(multi, inputs, strict=False)],
                device=device,
            )
            prompt.cache.batch_repeat_interleave(m)
            mask = torch.cat([prompt.mask.expand(m, -1), tmask], 1)
            out = base.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask, L),
                cache=prompt.cache,
                use_cache=True,
            )
            lp = out.logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            for i, rest in zip(multi, (lp * tmask).sum(-1).tolist(), strict=False):
                scores[i] += rest
    return scores


def prompt_logprobs(base, prompt_ids: list[int], prefix: KV | None = None, top: int = 0) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (and the prefix), with its
    `top` most likely alternatives: what OpenAI's legacy `echo` returns. The first token's logprob
    and alternatives are None: nothing before it predicts it. One forward over the prompt, THE
    rule of `kvcache.py`."""
    if not prompt_ids:
        raise ValueError("prompt must have at least one token")
    check_context(base, len(prompt_ids), prefix_length(prefix), 0)
    first = TokenLogprob(
        int(prompt_ids[0]),
        base.tokenizer.decode([int(prompt_ids[0])], skip_special_tokens=False, clean_up_tokenization_spaces=False),
        None,
        None,
    )
    if len(prompt_ids) == 1:
        return [first]
    with torch.inference_mode():
        device, dtype, L = base.device, _model_dtype(base.model), len(prompt_ids)
        kv, pmask = batch_prefixes(_same_prefixes([prefix], dtype, device), base.geometry, dtype, device)
        mask = torch.cat([pmask, torch.ones(1, L, dtype=torch.long, device=device)], 1)
        cache = GenerationCache(kv if pmask.shape[1] else None, reserve=mask.shape[1])
        out = base.model(
            input_ids=torch.tensor([list(prompt_ids)], device=device),
            attention_mask=mask,
            position_ids=positions_from_mask(mask, L),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[0, :-1].float()  # position t predicts token t + 1
        return [first, *token_logprobs(base.tokenizer, logits, list(prompt_ids[1:]), [top] * (L - 1))]


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
