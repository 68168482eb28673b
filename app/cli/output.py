"""What the CLI prints, and where.

- Results go to stdout: with `--json`, exactly one JSON document (the API's object); otherwise a
  Rich table or key/value grid in a terminal, and plain tab-separated or `key: value` lines
  without one, so that pipes and scripts get no colours, boxes or cursor movement.
- Progress and notes go to stdout in a plain run and to stderr under `--json`, so stdout stays
  one document.
- Errors go to stderr as `error: <the API's message>`, with a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table


class CLIError(Exception):
    """A failure to report in words (no traceback): printed to stderr, then exit `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.exit_code, self.status, self.code = message, exit_code, status, code


def _envelope_message(body: Any) -> tuple[str | None, str | None]:
    """(message, code) from an OpenAI error envelope, or from its inner `error` object."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]), inner.get("code")
    return None, None


def http_error(response) -> CLIError:
    """A CLIError from a non-2xx httpx response, with the API's message when it sent one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, code = _envelope_message(body)
    if message is None:
        text = response.text.strip()[:300]
        message = f"HTTP {response.status_code}" + (f": {text}" if text else "")
    return CLIError(message, status=response.status_code, code=code)


def check(response):
    """The response if it is a success, else raise its CLIError."""
    if response.is_success:
        return response
    if not response.is_closed:
        response.read()
    raise http_error(response)


@contextmanager
def api_errors(base_url: str):
    """Turn client exceptions into CLIErrors carrying the API's message. Commands that only use
    httpx never import openai (it costs about half a second at every start)."""
    import httpx

    try:
        yield
    except httpx.TransportError as e:
        raise CLIError(f"cannot reach the server at {base_url}: {e}") from None
    except Exception as e:
        openai = sys.modules.get("openai")
        if openai is None or not isinstance(e, openai.APIError):
            raise
        raise _openai_error(openai, e, base_url) from None


def _openai_error(openai, e, base_url: str) -> CLIError:
    if isinstance(e, openai.APIStatusError):
        message, code = _envelope_message(e.body)
        return CLIError(message or str(e), status=e.status_code, code=code)
    if isinstance(e, openai.APIConnectionError):
        return CLIError(f"cannot reach the server at {base_url}: {e.__cause__ or e}")
    message, code = _envelope_message(e.body)  # an error event inside a stream
    return CLIError(message or e.message, code=code)


def plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def when(ts: int | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


class Out:
    """The consoles of one command run."""

    def __init__(self, json_mode: bool = False):
        self.json = json_mode
        # markup off: server text (file names, messages, completions) is printed as it is
        self.stdout = Console(markup=False, highlight=False, soft_wrap=True)
        self.stderr = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
        self.notes = self.stderr if json_mode else self.stdout

    @property
    def tty(self) -> bool:
        return self.notes.is_terminal

    def note(self, text: str, style: str | None = None) -> None:
        """A line of progress or information (stderr under --json)."""
        self.notes.print(text, style=style if self.notes.is_terminal else None)

    def document(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        rows = [[plain(v) for v in row] for row in rows]
        if self.stdout.is_terminal:
            t = Table(*columns, box=None, header_style="bold", pad_edge=False)
            for row in rows:
                t.add_row(*row)
            self.stdout.print(t)
        else:
            for row in [list(columns), *rows]:
                sys.stdout.write("\t".join(row) + "\n")

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        pairs = [(k, plain(v)) for k, v in pairs]
        if self.stdout.is_terminal:
            t = Table(box=None, show_header=False, pad_edge=False)
            t.add_column(style="bold")
            t.add_column()
            for k, v in pairs:
                t.add_row(k, v)
            self.stdout.print(t)
        else:
            for k, v in pairs:
                sys.stdout.write(f"{k}: {v}\n")
