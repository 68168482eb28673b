"""Eval definitions (`POST /v1/evals`), validated whole before anything is created.

`validate_eval(data_source_config, testing_criteria)` returns an `EvalSpec` or raises
`EvalSpecError(message, param)` with `param` in OpenAI's form (`data_source_config.item_schema`,
`testing_criteria[1].operation`). Item rows (`validate_rows`, `validate_jsonl`) are checked
against the item_schema with `jsonschema`, and a bad row is reported by its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.evals.aggregate import ItemOutcome, grade_item
from app.evals.criteria import (
    CRITERIA,
    REFUSED,
    Criterion,
    CriterionResult,
    Sample,
    ScoreLabels,
)
from app.evals.errors import EvalSpecError, ItemError

MAX_CRITERIA = 64
# The sample namespace as OpenAI's custom data source config shows it beside the item schema.
SAMPLE_SCHEMA = {"type": "object", "properties": {"output_text": {"type": "string"}}, "required": ["output_text"]}


def _param(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _from_pydantic(e: ValidationError, prefix: str) -> EvalSpecError:
    err = e.errors()[0]
    param = _param(prefix, err["loc"])
    if err["type"] == "extra_forbidden":
        return EvalSpecError(f"Unknown parameter: '{param}'", param)
    if err["type"] == "missing":
        return EvalSpecError(f"Missing required parameter: '{param}'", param)
    return EvalSpecError(f"Invalid '{param}': {err['msg']}", param)


def check_item_schema(item_schema: Any, param: str = "data_source_config.item_schema"):
    """A JSON schema, of the draft its `$schema` names (else the newest), describing objects.
    Returns the jsonschema validator to check rows with."""
    import jsonschema

    if not isinstance(item_schema, Mapping):
        raise EvalSpecError("item_schema must be a JSON schema object", param)
    cls = jsonschema.validators.validator_for(item_schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(item_schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise EvalSpecError(f"item_schema is not a valid JSON schema: {e.message}", param + where) from None
    t = item_schema.get("type")
    if t is not None and t != "object" and not (isinstance(t, list) and "object" in t):
        raise EvalSpecError("item_schema must describe objects (type: object): each row's item is one",
                            f"{param}.type")
    return cls(item_schema)


@dataclass(frozen=True)
class EvalSpec:
    item_schema: dict[str, Any]
    include_sample_schema: bool
    criteria: tuple[Criterion, ...]

    def data_source_config(self) -> dict[str, Any]:
        """As it was given, normalised (what to store and to validate again with validate_eval)."""
        return {"type": "custom", "item_schema": self.item_schema,
                "include_sample_schema": self.include_sample_schema}

    def testing_criteria(self) -> list[dict[str, Any]]:
        """The criteria with their defaults filled in (for storage and for the Eval object)."""
        return [c.model_dump(mode="json") for c in self.criteria]

    def to_dict(self) -> dict[str, Any]:
        return {"data_source_config": self.data_source_config(), "testing_criteria": self.testing_criteria()}

    def response_data_source_config(self) -> dict[str, Any]:
        """OpenAI's `EvalCustomDataSourceConfig` of the Eval object: the namespaces as one schema."""
        props: dict[str, Any] = {"item": self.item_schema}
        required = ["item"]
        if self.include_sample_schema:
            props["sample"] = SAMPLE_SCHEMA
            required.append("sample")
        return {"type": "custom", "schema": {"type": "object", "properties": props, "required": required}}

    def grade(self, item: Mapping[str, Any], sample: Sample | None = None, *,
              score_labels: ScoreLabels | None = None) -> ItemOutcome:
        return grade_item(self.criteria, item, sample, score_labels=score_labels)


def parse_criterion(obj: Any, index: int, item_schema: Mapping[str, Any], include_sample: bool) -> Criterion:
    param = f"testing_criteria[{index}]"
    if not isinstance(obj, Mapping):
        raise EvalSpecError(f"{param} must be an object", param)
    kind = obj.get("type")
    if kind is None:
        raise EvalSpecError(f"Missing required parameter: '{param}.type'", f"{param}.type")
    if isinstance(kind, str) and kind in REFUSED:
        raise EvalSpecError(f"{param}: {REFUSED[kind]}", f"{param}.type")
    cls = CRITERIA.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EvalSpecError(
            f"{param}: unknown criterion type {kind!r}; supported: {', '.join(CRITERIA)}", f"{param}.type")
    try:
        criterion = cls.model_validate(dict(obj))
    except ValidationError as e:
        raise _from_pydantic(e, param) from None
    criterion.check(item_schema, include_sample, param)
    return criterion


def validate_eval(data_source_config: Any, testing_criteria: Any) -> EvalSpec:
    """The whole eval definition, or the first EvalSpecError in it."""
    p = "data_source_config"
    if not isinstance(data_source_config, Mapping):
        raise EvalSpecError(f"Missing required parameter: '{p}'", p)
    kind = data_source_config.get("type", "custom")
    if kind != "custom":
        raise EvalSpecError(f"data_source_config type {kind!r} is not supported: only 'custom' "
                            "(this server keeps no logs or stored completions to draw from)", f"{p}.type")
    extra = sorted(set(data_source_config) - {"type", "item_schema", "include_sample_schema"})
    if extra:
        raise EvalSpecError(f"Unknown parameter: '{p}.{extra[0]}'", f"{p}.{extra[0]}")
    if "item_schema" not in data_source_config:
        raise EvalSpecError(f"Missing required parameter: '{p}.item_schema'", f"{p}.item_schema")
    item_schema = data_source_config["item_schema"]
    check_item_schema(item_schema, f"{p}.item_schema")
    include_sample = data_source_config.get("include_sample_schema", False)
    if not isinstance(include_sample, bool):
        raise EvalSpecError("include_sample_schema must be a boolean", f"{p}.include_sample_schema")

    if not isinstance(testing_criteria, list) or not testing_criteria:
        raise EvalSpecError("testing_criteria must be a non-empty list of criteria", "testing_criteria")
    if len(testing_criteria) > MAX_CRITERIA:
        raise EvalSpecError(f"At most {MAX_CRITERIA} testing criteria, got {len(testing_criteria)}",
                            "testing_criteria")
    criteria = []
    names: dict[str, int] = {}
    for i, obj in enumerate(testing_criteria):
        c = parse_criterion(obj, i, item_schema, include_sample)
        # per_testing_criteria_results is keyed by name, so two criteria may not share one.
        if c.name in names:
            raise EvalSpecError(f"testing_criteria[{i}].name {c.name!r} repeats testing_criteria[{names[c.name]}]",
                                f"testing_criteria[{i}].name")
        names[c.name] = i
        criteria.append(c)
    return EvalSpec(dict(item_schema), include_sample, tuple(criteria))


# --- rows -------------------------------------------------------------------------------------

def _row_error(validator, item: Any) -> str | None:
    import jsonschema

    err = jsonschema.exceptions.best_match(validator.iter_errors(item))
    if err is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return f"item{where}: {err.message}"


def validate_rows(rows: Iterable[tuple[int, Any]], item_schema: Mapping[str, Any], *,
                  param: str = "data_source.source", max_errors: int = 10) -> int:
    """Check (line number, item) rows against the item_schema; returns the row count, or raises
    one EvalSpecError listing the first `max_errors` bad lines (and how many more)."""
    validator = check_item_schema(item_schema)
    errors: list[str] = []
    bad = n = 0
    for line, item in rows:
        n += 1
        reason = _row_error(validator, item) if not isinstance(item, ItemError) else str(item)
        if reason is not None:
            bad += 1
            if len(errors) < max_errors:
                errors.append(f"line {line}: {reason}")
    if bad:
        more = f"; ... and {bad - len(errors)} more" if bad > len(errors) else ""
        raise EvalSpecError(f"{bad} row{'s' if bad != 1 else ''} do not match the eval's item_schema: "
                            + "; ".join(errors) + more, param)
    if n == 0:
        raise EvalSpecError("the data source has no rows", param)
    return n


def _unwrap(row: Any) -> Any:
    # OpenAI's eval rows are {"item": {...}} (optionally with "sample"): the item is one field.
    if not isinstance(row, Mapping) or "item" not in row:
        return ItemError('expected an object {"item": {...}}')
    return row["item"]


def content_rows(content: Any, param: str = "data_source.source.content") -> Iterator[tuple[int, Any]]:
    """`source: {type: file_content, content: [{item: ...}]}` as (1-based position, item) rows."""
    if not isinstance(content, list):
        raise EvalSpecError("content must be a list of {\"item\": {...}} rows", param)
    for i, row in enumerate(content, 1):
        yield i, _unwrap(row)


def jsonl_rows(lines: Iterable[bytes | str]) -> Iterator[tuple[int, Any]]:
    """A JSONL eval file as (line number, item) rows, streaming (never the whole file at once).
    Blank lines are skipped but counted, so numbers match an editor's; a line that is not JSON,
    or not {"item": ...}, yields an ItemError in the item's place for validate_rows to report."""
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, ItemError("not UTF-8")
                continue
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            yield n, ItemError("not JSON")
            continue
        yield n, _unwrap(row)


def validate_jsonl(lines: Iterable[bytes | str], item_schema: Mapping[str, Any], *,
                   param: str = "data_source.source", max_errors: int = 10) -> int:
    return validate_rows(jsonl_rows(lines), item_schema, param=param, max_errors=max_errors)


__all__ = [
    "CriterionResult",
    "EvalSpec",
    "Sample",
    "check_item_schema",
    "content_rows",
    "jsonl_rows",
    "parse_criterion",
    "validate_eval",
    "validate_jsonl",
    "validate_rows",
]
