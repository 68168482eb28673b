"""Server-sent events as the completions routes send them, for the integration tests."""

from __future__ import annotations

import json


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded; the final "[DONE]" stays a string."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
