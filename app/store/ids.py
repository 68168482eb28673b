"""What an id the service issues looks like (`app.store.tables.new_id`): URL-safe, short. Anything
else (NUL bytes, slashes, a megabyte) names nothing, so it is refused before any query or path."""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9:._-]{1,255}$"
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str | None) -> bool:
    return isinstance(value, str) and bool(_ID_RE.match(value))
