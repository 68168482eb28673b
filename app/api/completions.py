"""/v1/completions, /v1/chat/completions and /v1/classify: OpenAI's shapes over the serving engine.

The rules each request goes through (parameters, limits before tokenizing, quotas, revocation, the
context check, streaming) are in docs/design/COMPLETIONS.md.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import SessionDep, SettingsDep, TenantDep, bearer_token, hash_key
from app.api.errors import APIError, envelope
from app.api.models import Resolved, get_engine, resolve_model
from app.ml.data import encode_prompt, format_chat
from app.ml.generate import MIN_TOP_P, GenerationFailedError, GenerationRequest, prompt_logprobs
from app.ml.generate import classify as ml_classify
from app.serving.engine import BaseChangedError, EngineNotReadyError, RequestCancelledError
from app.serving.scheduler import QueueFullError, SchedulerClosedError
from app.tenancy.quotas import (
    QuotaExceeded,
    RateLimiterUnavailable,
    charge_tokens_async,
    check_request_rate_async,
    limit_of,
)
from app.tenancy.stop_broadcast import recently_stopped

router = APIRouter(tags=["inference"])


def _queue_full(e: QueueFullError) -> APIError:
    """429 for a full queue: the whole server's, or this tenant's share of it (one tenant may not
    fill the queue for everyone); the message says which."""
    if e.tenant:
        msg = (
            f"Your requests fill your share of the server's queue ({e.queued} queued, limit {e.limit} per "
            f"tenant); retry after {e.retry_after_s} s"
        )
    else:
        msg = (
            f"The server is at capacity ({e.queued} requests queued, limit {e.limit}); retry after {e.retry_after_s} s"
        )
    return APIError(
        429,
        msg,
        type="rate_limit_error",
        code="tenant_queue_full" if e.tenant else "server_busy",
        headers={"Retry-After": str(e.retry_after_s)},
    )


IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    # what the official client sends for caching and abuse tracking: no effect on our output
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "verbosity",
}
DEFAULT_ONLY: dict[str, Any] = {
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None,
    "moderation": lambda v: v is None,
}
MAX_LABELS = 4096  # a static bound for the schema; the setting MAX_CLASSIFY_LABELS (default 64) applies
DISCONNECT_POLL_S = 0.25


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=255)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=MIN_TOP_P, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**62), le=2**62)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    best_of: int | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100; see check_logit_bias


class CompletionCreate(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict] | None = None


class ChatCompletionCreate(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ClassifyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=255)
    input: str
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)  # and MAX_CLASSIFY_LABELS


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the prompt's first token under echo
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: LegacyLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ClassificationItem(BaseModel):
    label: str
    logprob: float
    probability: float


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    model: str
    data: list[ClassificationItem]
    usage: Usage


SSE_DOC = {200: {"content": {"text/event-stream": {}}, "description": "With stream=true: server-sent events"}}


# ---------------------------------------------------------------------------------- checks


def check_params(body: _Common, settings, *, chat: bool) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name in DEFAULT_ONLY:
            if DEFAULT_ONLY[name](value):
                continue
            raise APIError(
                400,
                f"'{name}' is not supported by this server (only its default is accepted)",
                param=name,
                code="unsupported_parameter",
            )
        if chat and name in ("echo", "suffix"):
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
        raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    n = body.n or 1
    if n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n} (MAX_N), got {n}", param="n")
    if body.best_of not in (None, 1, n):
        raise APIError(
            400, "best_of is not supported (only best_of = n)", param="best_of", code="unsupported_parameter"
        )
    stops = stop_list(body.stop)
    if len(stops) > settings.max_stop_strings:
        raise APIError(
            400, f"At most {settings.max_stop_strings} stop strings (MAX_STOP_STRINGS), got {len(stops)}", param="stop"
        )
    if any(len(s) > settings.max_stop_string_chars for s in stops):
        raise APIError(
            400,
            f"A stop string may have at most {settings.max_stop_string_chars} characters (MAX_STOP_STRING_CHARS)",
            param="stop",
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    check_logit_bias(body.logit_bias)


def check_logit_bias(bias: dict[str, float] | None, vocab: int | None = None) -> dict[int, float] | None:
    """`logit_bias` as {token id: bias}: keys are token ids (JSON keys are strings), in [0, vocab)
    when `vocab` is given, values in -100..100 as OpenAI's; anything else is a 400 naming it."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if tok < 0 or (vocab is not None and tok >= vocab):
            raise APIError(
                400,
                f"logit_bias has token id {tok}, outside the vocabulary [0, {vocab})"
                if vocab
                else f"logit_bias has token id {tok}: token ids are not negative",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise APIError(
                400, f"logit_bias values must be between -100 and 100, got {value} for token {tok}", param="logit_bias"
            )
        out[tok] = float(value)
    return out


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if s]


def check_max_tokens(max_tokens: int, settings, param: str = "max_tokens") -> None:
    if max_tokens > settings.max_completion_tokens:
        raise APIError(
            400,
            f"{param} is {max_tokens}, over the limit of {settings.max_completion_tokens} (MAX_COMPLETION_TOKENS)",
            param=param,
        )


def check_context(
    served, prompt_tokens: int, prefix_tokens: int, max_tokens: int, settings, *, param: str = "prompt"
) -> None:
    if prompt_tokens > settings.max_prompt_tokens:
        raise APIError(
            400,
            f"The prompt has {prompt_tokens} tokens, over the limit of {settings.max_prompt_tokens} "
            "(MAX_PROMPT_TOKENS)",
            param=param,
            code="context_length_exceeded",
        )
    limit = int(served.base.geometry.max_positions)
    total = prompt_tokens + prefix_tokens + max_tokens
    if total > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, and the adapter's prefix takes "
            f"{prefix_tokens} of them. You requested {total} tokens ({prompt_tokens} in the prompt, "
            f"{prefix_tokens} in the prefix, {max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )


class RefusedPrompt(APIError):
    """A 4xx for a prompt refused before it is served. The route charges `charge` tokens to the
    tenant's tokens_per_minute before answering, so refused bodies spend the same budget as served
    ones (see `_charge_refused`)."""

    def __init__(self, message: str, *, charge: int, param: str = "prompt", code: str | None = None):
        super().__init__(400, message, param=param, code=code)
        self.charge = max(0, int(charge))


_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for: its longest token string, special
    and added tokens included (computed once per tokenizer). A byte-level BPE token's string has one
    character per byte and a SentencePiece piece one per character, so a text of more than
    limit x this characters cannot encode to `limit` tokens and is refused without tokenizing it."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        longest = max((len(t) for t in tokens if isinstance(t, str)), default=1)
    except Exception:  # noqa: BLE001 - a tokenizer without the API: a generous fixed bound
        longest = 64
    longest = max(1, int(longest))
    try:
        _TOKEN_CHARS[tokenizer] = longest
    except TypeError:
        pass
    return longest


def prompt_token_limit(served, settings) -> int:
    """No prompt may have more tokens than this: MAX_PROMPT_TOKENS, or the base's positions."""
    return min(int(settings.max_prompt_tokens), int(served.base.geometry.max_positions))


def refused_charge(prompt) -> int:
    """What a refused `prompt` is charged: one token per character of text or per token id, at
    least one per prompt. Counting needs no tokenizer, so it costs what parsing the body cost."""
    if isinstance(prompt, str):
        return max(1, len(prompt))
    if not prompt or isinstance(prompt[0], int):
        return len(prompt)
    # C-speed over 300,000 items: the lengths, plus one for each empty prompt
    return sum(map(len, prompt)) + prompt.count("" if isinstance(prompt[0], str) else [])


def prompt_count(prompt) -> int:
    """How many prompts `prompt` holds (one string, a list of strings, one token-id list, or a list
    of token-id lists), from its shape alone."""
    if isinstance(prompt, str) or not prompt:
        return 1 if isinstance(prompt, str) else 0
    return 1 if isinstance(prompt[0], int) else len(prompt)


def check_rows(prompts: int, n: int, settings) -> None:
    """prompts x n within max(MAX_N, MAX_BATCH_SIZE); raises `RefusedPrompt` without a charge (the
    caller sets it)."""
    rows = prompts * n
    limit = max(settings.max_n, settings.max_batch_size)
    if rows > limit:
        raise RefusedPrompt(f"At most {limit} choices per request (prompts x n), got {rows}", charge=0)


def check_text_length(text: str, token_limit: int, chars_per_token: int, *, param: str = "prompt") -> None:
    """Refuse, before tokenizing, a text too long to fit `token_limit` tokens (see `max_token_chars`)."""
    limit = token_limit * chars_per_token
    if len(text) > limit:
        raise RefusedPrompt(
            f"The {param} has {len(text)} characters, more than {token_limit} tokens (MAX_PROMPT_TOKENS or the "
            f"model's context) can hold with this tokenizer (at most {chars_per_token} characters per token): "
            f"at most {limit} characters",
            charge=len(text),
            param=param,
            code="context_length_exceeded",
        )


def message_text(content, index: int) -> str:
    """A chat message's content as text: a string, null, or a list of text parts
    (`{"type": "text", "text": ...}`, concatenated with no separator, as `app.ml.data.format_chat`
    joins them in training files). Any other part (`image_url`, `input_audio`, `file`, ...) is a 400
    naming it: the served bases read text only, and dropping the part would answer another question."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise APIError(
                400,
                f'Content parts of type {kind!r} are not supported: only text parts ({{"type": "text", "text": ...}})',
                param=f"messages[{index}].content[{j}]",
                code="unsupported_content_part",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise APIError(400, "A text part needs 'text', a string", param=f"messages[{index}].content[{j}].text")
        texts.append(text)
    return "".join(texts)


async def _charge_refused(request: Request, tenant, settings, err: APIError) -> None:
    """Charge a refused prompt (`RefusedPrompt.charge`, capped at the tenant's tokens_per_minute so
    that an oversized body spends the minute rather than nothing) before its 4xx goes out. When the
    window has no room for it the answer is the quota's 429, which also names the refusal. A rate
    limiter that cannot be reached leaves the 400: nothing is served, so nothing goes unmetered."""

    charge = getattr(err, "charge", 0)
    if not charge:
        return
    limit = limit_of(tenant, settings, "tokens_per_minute")
    try:
        await charge_tokens_async(request, tenant, min(charge, limit) if limit else charge)
    except QuotaExceeded as q:
        q.message = f"{q.message} (and the request was refused: {err.message})"
        raise q from None
    except RateLimiterUnavailable:
        pass


def _prompt_ids(tokenizer, text: str) -> list[int]:
    ids = encode_prompt(tokenizer, text)
    if not ids:  # an empty prompt starts a new document, as OpenAI's does
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            start = tokenizer.eos_token_id
        ids = [int(start)]
    return ids


def _completion_prompts(body: CompletionCreate, tokenizer, token_limit: int) -> list[list[int]]:
    """The prompts as token ids. Every length is checked before anything is tokenized or scanned:
    a text against `check_text_length`, a token-id list against `token_limit`."""
    p = body.prompt
    vocab = len(tokenizer)
    if not isinstance(p, str) and not p:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    texts = [p] if isinstance(p, str) else p if isinstance(p[0], str) else None
    if texts is not None:
        chars = max_token_chars(tokenizer)
        for text in texts:
            check_text_length(text, token_limit, chars)
        return [_prompt_ids(tokenizer, x) for x in texts]
    lists = [p] if isinstance(p[0], int) else p
    for ids in lists:
        if len(ids) > token_limit:
            raise RefusedPrompt(
                f"The prompt has {len(ids)} tokens, over the limit of {token_limit} (MAX_PROMPT_TOKENS "
                "or the model's context)",
                charge=len(ids),
                code="context_length_exceeded",
            )
    out = []
    for ids in lists:
        if not ids:
            raise APIError(400, "A token-id prompt must not be empty", param="prompt")
        if any(not 0 <= int(t) < vocab for t in ids):
            raise APIError(400, f"Token ids in prompt must be in [0, {vocab})", param="prompt")
        out.append([int(t) for t in ids])
    return out


# ---------------------------------------------------------------------------------- running


def credential(request: Request) -> str | None:
    """What `ServingEngine.cancel_key` matches on: the sha256 of the caller's API key."""
    token = bearer_token(request)
    return hash_key(token) if token else None


def stop_if_revoked(engine, request: Request, tenant_id: str) -> bool:
    """After submitting: if the caller's key was revoked (or its tenant suspended) since it was
    authenticated, the admin's cancel may have run before these rows were queued; cancel them now.
    True when it did (the request then fails with request_cancelled)."""
    stopped = recently_stopped(request.app)
    key = credential(request)
    if key and f"key:{key}" in stopped:
        engine.cancel_key(key)
        return True
    if f"tenant:{tenant_id}" in stopped:
        engine.cancel_tenant(tenant_id, "the tenant was suspended or deleted")
        return True
    return False


def _submit(engine, request: Request, tenant_id: str, requests: list, fingerprint: str, stream: bool):
    try:
        handle = engine.submit_generation(
            tenant_id, requests, fingerprint=fingerprint, stream=stream, key=credential(request)
        )
        stop_if_revoked(engine, request, tenant_id)
        return handle
    except QueueFullError as e:
        raise _queue_full(e) from None
    except (EngineNotReadyError, SchedulerClosedError) as e:
        raise APIError(503, str(e), code="model_loading", headers={"Retry-After": "5"}) from None


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, RequestCancelledError):
        return APIError(403, f"The request was cancelled: {exc}", type="permission_error", code="request_cancelled")
    if isinstance(exc, BaseChangedError):
        return APIError(409, str(exc) + "; send the request again", code="base_changed")
    if isinstance(exc, (EngineNotReadyError, SchedulerClosedError)):
        return APIError(503, str(exc), code="model_loading", headers={"Retry-After": "5"})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, GenerationFailedError):  # this row alone went bad; the batch went on
        return APIError(500, f"Generation failed: {exc}", type="server_error", code="generation_failed")
    return APIError(
        500, f"Generation failed: {type(exc).__name__}: {exc}", type="server_error", code="generation_failed"
    )


async def _await_results(request: Request, handle) -> list:
    """Results of all rows; cancels them if the client goes away meanwhile."""
    task = asyncio.ensure_future(handle.results())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                handle.cancel()
                task.cancel()
                raise APIError(499, "Client closed the request", code="client_closed")
        try:
            return task.result()
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _engine_error(exc) from None
    finally:
        if not task.done():
            handle.cancel()
            task.cancel()


def _usage(results: list, prompt_lens: list[int], n: int) -> Usage:
    prompt = sum(prompt_lens)  # each prompt counted once, however many choices it has
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(reason: str) -> str | None:
    return reason if reason in ("stop", "length") else None


def _legacy_logprobs(items, start_offset: int = 0) -> dict | None:
    if items is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    pos = start_offset
    for t in items:
        tokens.append(t.token)
        lps.append(t.logprob)
        tops.append(None if t.top is None else {tok: lp for _, tok, lp in t.top})
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(items, top: int | None) -> dict | None:
    if items is None:
        return None

    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", "replace"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for _, tok, lp in t.top[: top or 0]]}
            for t in items
        ],
        "refusal": None,
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(
    request: Request, handle, make_chunk, usage_chunk, include_usage: bool, prompt_lens: list[int], start_chunk=None
) -> AsyncIterator[str]:
    """SSE: `start_chunk(index)` first for each choice when given (chat's role chunk), one chunk per
    text delta, each choice's last chunk with its finish_reason, then the usage chunk (with
    stream_options.include_usage) and `data: [DONE]`.

    `make_chunk(index, text, finish, logprobs)` gets the TokenLogprobs of the tokens whose text it
    carries, as OpenAI sends them with each piece of text: a token whose text is held back (part of
    a multi-byte character, or of a possible stop string) goes with the chunk that releases it
    (the engine says which, `app.ml.generate._Row.advance`), and tokens whose text is never sent
    (EOS, a stop string's own) with the choice's last chunk. The chunks' logprobs together are the
    non-streamed answer's. None when the request asked for none."""
    results: dict[int, Any] = {}
    pending: dict[int, list] = {}  # per choice: TokenLogprobs not sent yet
    started: set[int] = set()
    try:
        async for event in handle.events():
            kind, index = event[0], event[1]
            if start_chunk is not None and kind != "error" and index not in started:
                started.add(index)
                yield _sse(start_chunk(index))
            if kind == "token":
                if len(event) > 4 and event[4]:  # the logprobs released with this text (DecodeBatch.step)
                    pending.setdefault(index, []).extend(event[4])
                if event[3]:
                    yield _sse(make_chunk(index, event[3], None, pending.pop(index, None)))
            elif kind == "done":
                results[index] = event[2]
                yield _sse(make_chunk(index, "", _finish(event[2].finish_reason) or "stop", pending.pop(index, None)))
            elif kind == "error":
                handle.cancel()
                err = _engine_error(event[2])
                yield _sse(envelope(err.status_code, err.message, err.type, err.param, err.code))
                yield "data: [DONE]\n\n"
                return
        if include_usage:
            yield _sse(usage_chunk(_usage(list(results.values()), prompt_lens, handle.n).model_dump()))
        yield "data: [DONE]\n\n"
    finally:
        if len(results) < handle.n:  # client went away (or the generator was closed): free the rows
            handle.cancel()


def _gen_requests(
    prompts: list[list[int]],
    resolved: Resolved,
    body,
    max_tokens: int,
    logprobs: int | None,
    logit_bias: dict[int, float] | None = None,
):
    n = body.n or 1
    stops = stop_list(body.stop)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    out = []
    for ids in prompts:
        for j in range(n):
            out.append(
                GenerationRequest(
                    prompt_ids=ids,
                    prefix=resolved.prefix,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stops,
                    seed=None if body.seed is None else body.seed + j,
                    logprobs=logprobs,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    logit_bias=logit_bias,
                )
            )
    return out


def _then_close(session, fn):
    """fn() then close the session, in the same worker thread: its connection goes back to the pool
    before the route awaits anything (generation, the event loop), never held while waiting."""
    try:
        return fn()
    finally:
        session.close()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# ---------------------------------------------------------------------------------- routes


@router.post("/v1/completions", response_model=Completion, responses=SSE_DOC)
async def create_completion(
    body: CompletionCreate, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep
):
    await check_request_rate_async(request, tenant)  # 429 over requests_per_minute (app/tenancy/quotas.py)
    check_params(body, settings, chat=False)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_max_tokens(max_tokens, settings)
    n = body.n or 1
    if body.echo and n > 1:
        raise APIError(400, "echo is supported with n = 1 only", param="echo", code="unsupported_parameter")
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream", param="echo", code="unsupported_parameter")
    try:  # from the body's shape: 300,000 one-character prompts are refused before any is tokenized
        check_rows(prompt_count(body.prompt), n, settings)
    except RefusedPrompt as e:
        e.charge = refused_charge(body.prompt)
        await _charge_refused(request, tenant, settings, e)
        raise
    engine = get_engine(request)

    def prepare():
        resolved = resolve_model(session, engine, tenant.id, body.model)
        tokenizer = resolved.served.base.tokenizer
        bias = check_logit_bias(body.logit_bias, len(tokenizer))
        prompts = _completion_prompts(body, tokenizer, prompt_token_limit(resolved.served, settings))
        try:
            for ids in prompts:
                check_context(resolved.served, len(ids), resolved.num_virtual_tokens, max_tokens, settings)
        except APIError as e:
            e.charge = sum(len(p) for p in prompts)  # tokenized, then refused: charged what it was
            raise
        return resolved, prompts, bias

    try:
        resolved, prompts, bias = await run_in_threadpool(_then_close, session, prepare)
    except APIError as e:
        await _charge_refused(request, tenant, settings, e)
        raise
    await charge_tokens_async(request, tenant, sum(len(p) for p in prompts) + max_tokens * n * len(prompts))
    requests = _gen_requests(prompts, resolved, body, max_tokens, body.logprobs, bias)
    handle = _submit(engine, request, tenant.id, requests, resolved.served.fingerprint, bool(body.stream))
    cid, created, model = _new_id("cmpl"), int(time.time()), body.model
    prompt_lens = [len(p) for p in prompts]

    # the served base's fingerprint, on every chunk as on the whole answer (the spec's string)
    fingerprint = resolved.served.fingerprint or None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        offsets: dict[int, int] = {}  # per choice: text_offset of its next token, as in the whole answer

        def chunk(index, text, finish, lps):
            lp = None
            if body.logprobs is not None and lps:
                lp = _legacy_logprobs(lps, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t.token) for t in lps)
            out = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": fingerprint,
                "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = None
            return out

        def usage_chunk(usage):
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }

        return StreamingResponse(
            _stream(request, handle, chunk, usage_chunk, include_usage, prompt_lens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    results = await _await_results(request, handle)
    echoed = await _echoes(engine, request, tenant.id, resolved, body, prompts) if body.echo else None
    choices = []
    for i, r in enumerate(results):
        head, head_lps = echoed[i] if echoed else ("", [])
        lps = _legacy_logprobs(head_lps + r.logprobs) if body.logprobs is not None else None
        choices.append(
            CompletionChoice(text=head + r.text, index=i, finish_reason=_finish(r.finish_reason), logprobs=lps)
        )
    return Completion(
        id=cid,
        created=created,
        model=model,
        choices=choices,
        usage=_usage(results, prompt_lens, n),
        system_fingerprint=resolved.served.fingerprint or None,
    )


async def _echoes(
    engine, request: Request, tenant_id: str, resolved: Resolved, body: CompletionCreate, prompts: list[list[int]]
) -> list[tuple[str, list]]:
    """`echo`: each prompt's text (as sent, or decoded from its token ids) and, with `logprobs`,
    its tokens' log-probabilities, computed on the scheduler thread in fair turn with generation."""

    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt if isinstance(body.prompt[0], str) else None
    tokenizer = resolved.served.base.tokenizer
    out = []
    for i, ids in enumerate(prompts):
        text = (
            texts[i]
            if texts is not None
            else tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
        lps: list = []
        if body.logprobs is not None:
            prefix, top = resolved.prefix, body.logprobs
            try:
                lps = await engine.run_call(
                    tenant_id,
                    lambda base, ids=ids, prefix=prefix, top=top: prompt_logprobs(base, ids, prefix, top),
                    fingerprint=resolved.served.fingerprint,
                    key=credential(request),
                )
            except QueueFullError as e:
                raise _queue_full(e) from None
            except Exception as exc:  # noqa: BLE001 - mapped like a generation's errors
                raise _engine_error(exc) from None
        out.append((text, lps))
    return out


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=SSE_DOC)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep
):
    await check_request_rate_async(request, tenant)
    check_params(body, settings, chat=True)
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise APIError(
            400, "Give max_tokens or max_completion_tokens, not two different values", param="max_completion_tokens"
        )
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is not None:
        check_max_tokens(
            requested, settings, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": m.role, "content": message_text(m.content, i)} for i, m in enumerate(body.messages)]
    # what the template renders at least (roles and contents), checked before it renders anything
    chars = sum(max(1, len(m["role"]) + len(m["content"])) for m in messages)
    engine = get_engine(request)

    def prepare():
        resolved = resolve_model(session, engine, tenant.id, body.model)
        tokenizer = resolved.served.base.tokenizer
        bias = check_logit_bias(body.logit_bias, len(tokenizer))
        token_limit = prompt_token_limit(resolved.served, settings)
        if len(messages) > token_limit:  # each renders at least its role: one token or more
            raise RefusedPrompt(
                f"At most {token_limit} messages (MAX_PROMPT_TOKENS or the model's context), got {len(messages)}",
                charge=chars,
                param="messages",
                code="context_length_exceeded",
            )
        per_token = max_token_chars(tokenizer)
        if chars > token_limit * per_token:
            raise RefusedPrompt(
                f"The messages have {chars} characters, more than {token_limit} tokens (MAX_PROMPT_TOKENS "
                f"or the model's context) can hold with this tokenizer (at most {per_token} characters "
                f"per token): at most {token_limit * per_token} characters",
                charge=chars,
                param="messages",
                code="context_length_exceeded",
            )
        try:
            text = format_chat(messages, tokenizer, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects the messages
            raise APIError(400, f"The messages cannot be formatted: {e}", param="messages") from None
        check_text_length(text, token_limit, per_token, param="messages")
        ids = _prompt_ids(tokenizer, text)
        P = resolved.num_virtual_tokens
        max_tokens = requested
        try:
            if max_tokens is None:
                room = int(resolved.served.base.geometry.max_positions) - len(ids) - P
                max_tokens = max(0, min(settings.max_completion_tokens, room))
                if max_tokens == 0:
                    check_context(resolved.served, len(ids), P, 1, settings, param="messages")
            check_context(resolved.served, len(ids), P, max_tokens, settings, param="messages")
        except APIError as e:
            e.charge = len(ids)  # tokenized, then refused: charged what it was
            raise
        return resolved, ids, max_tokens, bias

    try:
        resolved, ids, max_tokens, bias = await run_in_threadpool(_then_close, session, prepare)
    except APIError as e:
        await _charge_refused(request, tenant, settings, e)
        raise
    n = body.n or 1
    await charge_tokens_async(request, tenant, len(ids) + max_tokens * n)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = _gen_requests([ids], resolved, body, max_tokens, logprobs, bias)
    handle = _submit(engine, request, tenant.id, requests, resolved.served.fingerprint, bool(body.stream))
    cid, created, model = _new_id("chatcmpl"), int(time.time()), body.model
    fingerprint = resolved.served.fingerprint or None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index, text, finish, lps, delta=None):
            delta = {"content": text} if delta is None and (text or not finish) else delta or {}
            lp = _chat_logprobs(lps, body.top_logprobs) if body.logprobs and lps else None
            out = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = None
            return out

        def role_chunk(index):
            # first for each choice, as OpenAI's: content "" even when a stop string ends the choice
            # at once, so the Python client's stream helper gives content "" rather than None
            return chunk(index, "", None, None, {"role": "assistant", "content": "", "refusal": None})

        def usage_chunk(usage):
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }

        return StreamingResponse(
            _stream(request, handle, chunk, usage_chunk, include_usage, [len(ids)], role_chunk),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    results = await _await_results(request, handle)
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=r.text),
            finish_reason=_finish(r.finish_reason),
            logprobs=_chat_logprobs(r.logprobs, body.top_logprobs) if body.logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletion(
        id=cid,
        created=created,
        model=model,
        choices=choices,
        usage=_usage(results, [len(ids)], n),
        system_fingerprint=fingerprint,
    )


@router.post("/v1/classify", response_model=Classification)
async def classify(
    body: ClassifyCreate, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> Classification:
    """Extension: the probability of each label as the continuation of `input`, under the model.

    Each label is scored as the exact text appended to `input` (include a leading space if your
    prompts expect one); probabilities are normalised over the given labels. `data` keeps the
    order of `labels`."""
    await check_request_rate_async(request, tenant)
    labels = body.labels
    if len(labels) > settings.max_classify_labels:
        raise APIError(
            400,
            f"At most {settings.max_classify_labels} labels (MAX_CLASSIFY_LABELS), got {len(labels)}",
            param="labels",
        )
    if len(set(labels)) != len(labels):
        raise APIError(400, "labels must be distinct", param="labels")
    if any(not label for label in labels):
        raise APIError(400, "labels must be non-empty strings", param="labels")
    engine = get_engine(request)

    def prepare():
        resolved = resolve_model(session, engine, tenant.id, body.model)
        tok = resolved.served.base.tokenizer
        token_limit, per_token = prompt_token_limit(resolved.served, settings), max_token_chars(tok)
        check_text_length(body.input, token_limit, per_token, param="input")
        for label in labels:
            check_text_length(label, token_limit, per_token, param="labels")
        ids = _prompt_ids(tok, body.input)
        label_ids = [list(tok(label, add_special_tokens=False)["input_ids"]) for label in labels]
        if any(not x for x in label_ids):
            raise APIError(400, "every label must encode to at least one token", param="labels")
        try:
            check_context(
                resolved.served,
                len(ids) + max(len(x) for x in label_ids),
                resolved.num_virtual_tokens,
                0,
                settings,
                param="input",
            )
        except APIError as e:
            e.charge = len(ids) + sum(len(x) for x in label_ids)  # tokenized, then refused
            raise
        return resolved, ids, label_ids

    try:
        resolved, ids, label_ids = await run_in_threadpool(_then_close, session, prepare)
    except APIError as e:
        await _charge_refused(request, tenant, settings, e)
        raise
    await charge_tokens_async(request, tenant, len(ids) * len(labels) + sum(len(x) for x in label_ids))
    prefix = resolved.prefix

    def run(base):
        return ml_classify(base, ids, label_ids, prefix)

    try:
        scored = await engine.run_call(tenant.id, run, fingerprint=resolved.served.fingerprint, key=credential(request))
    except QueueFullError as e:
        raise _queue_full(e) from None
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    if stop_if_revoked(engine, request, tenant.id):  # revoked while it ran: the answer is withheld
        raise _engine_error(RequestCancelledError("the API key was revoked or the tenant suspended"))
    prompt_tokens = len(ids) * len(labels) + sum(len(x) for x in label_ids)
    return Classification(
        model=body.model,
        data=[
            ClassificationItem(label=label, logprob=lp, probability=p)
            for label, (lp, p) in zip(labels, scored, strict=False)
        ],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens),
    )
