"""`{{item.a.b}}` / `{{sample.output_text}}` templates, as OpenAI's evals use them."""
from __future__ import annotations

import json
import re
from typing import Any

from .errors import EvalSpecError, ItemError

_REF = re.compile(r"\{\{\s*([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\s*\}\}")
_SAMPLE_FIELDS = {"output_text"}


def references(template: str) -> list[list[str]]:
    """Dotted paths named in a template, e.g. [['item','a','b'], ['sample','output_text']]."""
    return [m.group(1).split(".") for m in _REF.finditer(template)]


def _schema_has(schema: dict, path: list[str]) -> bool:
    # Walk `properties`; a schema that says nothing of its properties (no `properties`, or
    # additionalProperties allowed without them) cannot prove a field absent, so it is accepted.
    node = schema
    for key in path:
        if not isinstance(node, dict):
            return False
        props = node.get("properties")
        if props is None:
            return True
        if key not in props:
            return False
        node = props[key]
    return True


def check_template(template: str, item_schema: dict, param: str, *, allow_sample: bool = True) -> None:
    """Creation-time check: every `{{item.x}}` must exist in item_schema, `{{sample.x}}` must be a
    known sample field. Raises EvalSpecError naming `param`."""
    for path in references(template):
        root, rest = path[0], path[1:]
        if root == "item":
            if not rest or not _schema_has(item_schema, rest):
                raise EvalSpecError(f"template names {'.'.join(path)!r}, which item_schema does not define", param)
        elif root == "sample":
            if not allow_sample:
                raise EvalSpecError(f"{{{{{'.'.join(path)}}}}} is not available here (no sample yet)", param)
            if rest != ["output_text"]:
                raise EvalSpecError(f"unknown sample field {'.'.join(path)!r}; only sample.output_text", param)
        else:
            raise EvalSpecError(f"template names {'.'.join(path)!r}; use item.* or sample.output_text", param)


def _lookup(ctx: dict, path: list[str]) -> Any:
    node: Any = ctx
    for key in path:
        if not isinstance(node, dict) or key not in node or node[key] is None:
            raise ItemError(f"missing value for {{{{{'.'.join(path)}}}}}")
        node = node[key]
    return node


def _as_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def render(template: str, item: dict, sample: dict | None = None) -> str:
    """Render to text; a missing value is an ItemError (that item errors, not the run)."""
    ctx = {"item": item, "sample": sample or {}}
    return _REF.sub(lambda m: _as_text(_lookup(ctx, m.group(1).split("."))), template)


def render_value(template: str, item: dict, sample: dict | None = None) -> Any:
    """Like render, but a template that is exactly one reference yields the raw value (a list of
    BIO tags, a list of answers) so structured criteria need not re-parse JSON."""
    m = _REF.fullmatch(template.strip())
    if m:
        return _lookup({"item": item, "sample": sample or {}}, m.group(1).split("."))
    return render(template, item, sample)


def render_messages(template: list[dict], item: dict) -> list[dict]:
    """Chat input_messages template [{role, content}] -> messages (before sampling)."""
    return [{"role": m["role"], "content": render(m["content"], item)} for m in template]
