"""`{{item.field}}` / `{{sample.output_text}}` templates, as OpenAI's Evals API writes them.

A placeholder is `{{ namespace.path }}` (spaces inside the braces optional), with `namespace`
`item` (the data row; nested fields by dots, `{{item.a.b}}`) or `sample` (the model's answer:
only `output_text` here). Anything else between double braces is refused at creation rather
than copied through, so a typo never reaches a model as literal text.

Two checks happen at different times, on purpose:
- at creation, `check_template` looks every `item` path up in the eval's `item_schema`
  (its `properties`, nested; also `patternProperties`, local `$ref`s and `allOf`/`anyOf`/
  `oneOf`), so a misspelt field is a 400 before any run. A level that declares fields admits
  only those (unless `additionalProperties` is given explicitly); a level that declares none
  (`{"type": "object"}`) cannot prove a field absent and admits any;
- at run time, `render` looks the values up in the row; a value that is absent (the schema
  did not require it) or null makes that item `errored` (`ItemError`), never an empty string
  that would silently grade.

Values that are not strings render as JSON (`3`, `true`, `["a", "b"]`), so numbers and lists
compare the same way whichever row they came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.evals.errors import EvalSpecError, ItemError

NAMESPACES = ("item", "sample")
# The sample namespace holds what the model produced; output_text is the field every grader uses.
SAMPLE_FIELDS = ("output_text",)

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_EXPR = re.compile(r"^(item|sample)((?:\.[^.\s{}]+)+)$")


@dataclass(frozen=True)
class Ref:
    namespace: str  # "item" | "sample"
    path: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join((self.namespace, *self.path))


def refs(template: str, param: str) -> list[Ref]:
    """Every placeholder of `template`, parsed; a malformed one is an EvalSpecError at `param`."""
    out = []
    for m in _PLACEHOLDER.finditer(template):
        expr = m.group(1).strip()
        em = _EXPR.match(expr)
        if not em:
            raise EvalSpecError(
                f"Unsupported template expression {m.group(0)!r} in {param}: use {{{{item.<field>}}}} "
                "or {{sample.output_text}}", param)
        out.append(Ref(em.group(1), tuple(em.group(2)[1:].split("."))))
    return out


def _resolve_ref(root: Any, ref: str) -> Any:
    """A local JSON pointer (`#/$defs/x`) inside the item schema; remote refs are not followed
    (that would be network I/O at validation), so they count as 'not found'."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _child_schemas(schema: Any, field: str, root: Any, depth: int = 0) -> list[Any] | None:
    """The subschemas that describe `field` of an object matched by `schema`: a list (empty when
    the schema rules the field out), or None when the schema says nothing of its fields at all."""
    if depth > 32:  # a $ref cycle
        return []
    if schema is True or not isinstance(schema, Mapping):
        return None if schema is True else []
    found: list[Any] = []
    speaks = False  # does this level declare any fields?
    if "$ref" in schema:
        target = _resolve_ref(root, schema["$ref"])
        sub = _child_schemas(target, field, root, depth + 1) if target is not None else []
        speaks = True
        if sub is None:
            return None
        found += sub
    props = schema.get("properties")
    if isinstance(props, Mapping):
        speaks = True
        if field in props:
            found.append(props[field])
    pattern_props = schema.get("patternProperties")
    if isinstance(pattern_props, Mapping):
        speaks = True
        for pattern, sub in pattern_props.items():
            try:
                if re.search(pattern, field):
                    found.append(sub)
            except re.error:
                pass
    for key in ("allOf", "anyOf", "oneOf"):
        for sub_schema in schema.get(key) or ():
            speaks = True
            sub = _child_schemas(sub_schema, field, root, depth + 1)
            if sub is None:
                return None
            found += sub
    extra = schema.get("additionalProperties")
    if not found and (extra is True or isinstance(extra, Mapping)):
        # An explicit `additionalProperties` opens a level to undeclared fields.
        return None if extra is True else [extra]
    if not speaks:
        # `{"type": "object"}` declares nothing, so it cannot prove a field absent. Where a level
        # does declare its fields, an undeclared name is refused even though JSON Schema's default
        # would admit it: that is how a misspelt `{{item.lable}}` is caught at creation.
        return None
    return found


def schema_has_path(item_schema: Mapping[str, Any], path: list[str] | tuple[str, ...]) -> bool:
    level: list[Any] = [item_schema]
    for field in path:
        nxt: list[Any] = []
        for s in level:
            sub = _child_schemas(s, field, item_schema)
            if sub is None:
                return True
            nxt += sub
        if not nxt:
            return False
        level = nxt
    return True


def references(template: str, param: str = "template") -> list[list[str]]:
    """Dotted paths a template names, e.g. [['item', 'a', 'b'], ['sample', 'output_text']]."""
    return [[r.namespace, *r.path] for r in refs(template, param)]


def check_template(template: str, item_schema: Mapping[str, Any], param: str, *,
                   allow_sample: bool = True) -> list[Ref]:
    """Parse `template` and check each reference against the eval's namespaces (creation time)."""
    found = refs(template, param)
    for ref in found:
        if ref.namespace == "sample":
            if not allow_sample:
                raise EvalSpecError(
                    f"{param} references {{{{{ref}}}}}, but there is no sample here: the sample namespace "
                    "exists only in testing criteria of an eval whose data_source_config has "
                    "include_sample_schema: true", param)
            if ref.path != ("output_text",):
                raise EvalSpecError(
                    f"{param} references {{{{{ref}}}}}: the sample namespace has only "
                    f"{', '.join('sample.' + f for f in SAMPLE_FIELDS)}", param)
        elif not schema_has_path(item_schema, ref.path):
            raise EvalSpecError(
                f"{param} references {{{{{ref}}}}}, which the item_schema does not define "
                "(declare it under properties)", param)
    return found


def lookup(ref: Ref, item: Mapping[str, Any], sample: Mapping[str, Any] | None) -> Any:
    """The value a reference names (run time); absent or null is an ItemError."""
    node: Any = item if ref.namespace == "item" else sample
    if node is None:
        raise ItemError(f"{{{{{ref}}}}}: no sample to read it from")
    for i, field in enumerate(ref.path):
        if not isinstance(node, Mapping) or field not in node:
            where = ".".join((ref.namespace, *ref.path[:i + 1]))
            raise ItemError(f"{{{{{ref}}}}}: the {ref.namespace} has no field {where!r}")
        node = node[field]
    if node is None:
        raise ItemError(f"{{{{{ref}}}}} is null")
    return node


def to_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, item: Mapping[str, Any], sample: Mapping[str, Any] | None = None) -> str:
    """`template` with every placeholder replaced by its value as text (run time)."""
    def sub(m: re.Match) -> str:
        # Placeholders were validated at creation; refs() would raise EvalSpecError otherwise.
        (ref,) = refs(m.group(0), "template")
        return to_text(lookup(ref, item, sample))

    return _PLACEHOLDER.sub(sub, template)


def render_value(template: str, item: Mapping[str, Any], sample: Mapping[str, Any] | None = None) -> Any:
    """Like render, but a template that is one placeholder alone yields the raw value (a list of
    gold answers, a list of BIO tags) instead of its JSON text."""
    found = refs(template, "template")
    if len(found) == 1 and _PLACEHOLDER.fullmatch(template.strip()):
        return lookup(found[0], item, sample)
    return render(template, item, sample)


def render_messages(template: list[Mapping[str, Any]], item: Mapping[str, Any]) -> list[dict[str, str]]:
    """A chat template already reduced to [{role, content: str}] -> messages for one item (before
    sampling, so no sample namespace). `app.evals.inputs` parses OpenAI's richer shapes into this."""
    return [{"role": m["role"], "content": render(m["content"], item)} for m in template]
