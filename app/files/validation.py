"""Dataset validation: a pure function over a byte stream. No I/O beyond reading the stream.

Formats:
- `fine-tune`: JSONL, one object per line, either `{"prompt": str, "completion": str}` or
  `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` ending with a
  non-empty assistant message.
- `base-train`: plain text (one document per non-empty line), or JSONL of `{"text": str}`.

Blank lines are skipped. Every bad line is reported as `line N: reason` with N counted from 1:
`not UTF-8`, `too long (B bytes, limit L)`, `not JSON`, `not a JSON object`,
`missing field "completion"`, `field "prompt" must be a string`, `empty completion`, ... The list
is capped (`max_errors`), with a count of the rest. Any bad line, or no rows at all, fails the
file. Lines longer than `max_line_bytes` are skipped without being held in memory.

Token counts use `count_tokens(text)` when given (the served base's tokenizer), else the
estimate `ceil(utf8_bytes / 4)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

CHUNK = 64 * 1024
ROLES = ("system", "user", "assistant")


@dataclass
class ValidationResult:
    ok: bool
    rows: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)  # capped
    error_count: int = 0

    @property
    def details(self) -> str | None:
        if self.ok:
            return None
        if not self.errors:
            return "file is empty: no examples found"
        text = "; ".join(self.errors)
        more = self.error_count - len(self.errors)
        if more > 0:
            text += f"; ... and {more} more bad line{'s' if more > 1 else ''}"
        return f"{self.error_count} bad line{'s' if self.error_count != 1 else ''}: {text}"


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4)


def iter_lines(stream: BinaryIO | Iterable[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line number, line bytes without the newline or None when too long, length)."""
    if hasattr(stream, "read"):
        def chunks():
            while True:
                b = stream.read(CHUNK)
                if not b:
                    return
                yield b
        source = chunks()
    else:
        source = iter(stream)
    lineno = 0
    buf = bytearray()
    length = 0  # bytes of the current line, even when not buffered
    overflow = False
    for chunk in source:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            length += len(piece)
            if not overflow:
                if length > max_line_bytes:
                    overflow = True
                    buf.clear()
                else:
                    buf += piece
            if nl < 0:
                break
            lineno += 1
            yield lineno, (None if overflow else _strip_cr(bytes(buf))), length
            buf.clear()
            length, overflow = 0, False
            start = nl + 1
    if length or buf:
        lineno += 1
        yield lineno, (None if overflow else _strip_cr(bytes(buf))), length


def _strip_cr(b: bytes) -> bytes:
    return b[:-1] if b.endswith(b"\r") else b


def _check_prompt_completion(obj: dict) -> tuple[str | None, str]:
    for name in ("prompt", "completion"):
        if name not in obj:
            return f'missing field "{name}"', ""
        if not isinstance(obj[name], str):
            return f'field "{name}" must be a string', ""
    if not obj["completion"].strip():
        return "empty completion", ""
    return None, obj["prompt"] + obj["completion"]


def _check_messages(obj: dict) -> tuple[str | None, str]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return 'field "messages" must be a non-empty list', ""
    texts = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object", ""
        if m.get("role") not in ROLES:
            return f'messages[{i}].role must be one of {", ".join(ROLES)}', ""
        if "content" not in m:
            return f'missing field "messages[{i}].content"', ""
        if not isinstance(m["content"], str):
            return f'field "messages[{i}].content" must be a string', ""
        texts.append(m["content"])
    if msgs[-1]["role"] != "assistant":
        return "the last message must be from the assistant", ""
    if not msgs[-1]["content"].strip():
        return "empty completion", ""
    return None, "\n".join(texts)


def _check_text_record(obj: dict) -> tuple[str | None, str]:
    if "text" not in obj:
        return 'missing field "text"', ""
    if not isinstance(obj["text"], str):
        return 'field "text" must be a string', ""
    if not obj["text"].strip():
        return "empty text", ""
    return None, obj["text"]


def validate_dataset(
    stream: BinaryIO | Iterable[bytes],
    purpose: str,
    fmt: str = "jsonl",
    max_line_bytes: int = 64 * 1024,
    count_tokens: Callable[[str], int] | None = None,
    max_errors: int = 20,
    max_rows: int | None = None,
) -> ValidationResult:
    """Validate a dataset. `purpose` is `fine-tune`, `base-train` or `evals` (rows `{"item": {...}}`,
    checked against an eval's item_schema when a run is created); `fmt` is `jsonl` or `text`."""
    if purpose not in ("fine-tune", "base-train", "evals"):
        raise ValueError(f"unknown purpose {purpose!r}")
    if purpose in ("fine-tune", "evals"):
        fmt = "jsonl"
    count = count_tokens or estimate_tokens
    res = ValidationResult(ok=True)

    def bad(lineno: int, reason: str) -> None:
        res.error_count += 1
        if len(res.errors) < max_errors:
            res.errors.append(f"line {lineno}: {reason}")

    for lineno, raw, length in iter_lines(stream, max_line_bytes):
        if raw is None:
            bad(lineno, f"too long ({length} bytes, limit {max_line_bytes})")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad(lineno, "not UTF-8")
            continue
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if not line.strip():
            continue
        if fmt == "text":
            text = line
        else:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                bad(lineno, "not JSON")
                continue
            if not isinstance(obj, dict):
                bad(lineno, "not a JSON object")
                continue
            if purpose == "base-train":
                reason, text = _check_text_record(obj)
            elif purpose == "evals":
                reason, text = (None, line) if isinstance(obj.get("item"), dict) else (
                    'expected {"item": {...}}: an eval row holds its item', "")
            elif "messages" in obj:
                reason, text = _check_messages(obj)
            elif "prompt" in obj or "completion" in obj:
                reason, text = _check_prompt_completion(obj)
            else:
                reason, text = 'missing field "completion" (expected "prompt" and "completion", or "messages")', ""
            if reason:
                bad(lineno, reason)
                continue
        res.rows += 1
        if max_rows is not None and res.rows > max_rows:
            bad(lineno, f"too many rows (limit {max_rows})")
            break
        try:
            res.tokens += int(count(text))
        except Exception:  # a tokenizer hiccup never fails validation
            res.tokens += estimate_tokens(text)
    res.ok = res.error_count == 0 and res.rows > 0
    return res


def detect_format(filename: str, purpose: str) -> str:
    """`fine-tune` is always JSONL; `base-train` is JSONL when named .jsonl/.json, else text."""
    if purpose != "base-train":
        return "jsonl"
    name = filename.lower()
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"
