"""What a client may ask for when it creates a job: strict request models and their limits.

Every model forbids unknown fields, so a typo is a 400 naming the field instead of a silently
ignored setting. Static ranges live on the fields; limits that are settings (`max_n_epochs`,
`max_num_virtual_tokens`, ...) are checked by `check_limits`, which names the same parameter path
(`method.prefix.hyperparameters.n_epochs`). Nothing is ever clamped.

Defaults: every field may be omitted. `None` (or `"auto"` for the three OpenAI hyperparameters)
means "the engine's default", resolved when the job starts and then written back into the job's
`method` and `hyperparameters`, as OpenAI does for `"auto"`:

- prefix: `num_virtual_tokens`, `prefix_projection`, `projection_hidden_size`, `init` and every
  hyperparameter default to `PrefixTrainingConfig`'s values (`app/ml/config.py`);
- base: `architecture`/`size` default to the engine's default preset, hyperparameters to
  `train_base`'s defaults.

`app/jobs/hyperparameters.py` turns a method into the engine's config.

`{"type": "supervised", "supervised": {"hyperparameters": {...}}}` (OpenAI's method) is accepted
as an alias of `{"type": "prefix"}` with those hyperparameters, so the official client's default
request works unchanged. So is the deprecated top-level `hyperparameters` field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.config import Settings

SUFFIX_RE = re.compile(r"^[a-z0-9-]{1,40}$")
ID_RE = r"^[A-Za-z0-9:._-]+$"

# Static limits that are not worth a setting: they only keep a number sane.
MAX_BATCH_SIZE = 1024
MAX_LR_MULTIPLIER = 100.0
MAX_PROJECTION_HIDDEN = 8192
MAX_EVAL_EVERY = 1_000_000
MAX_INIT_TEXT_CHARS = 4000
MAX_METADATA_PAIRS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Auto = Literal["auto"]


class Hyperparameters(_Strict):
    n_epochs: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="Passes over the training file (≤ settings.max_n_epochs). 'auto': engine default.")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Auto = Field(
        "auto", description="Examples per optimizer step. 'auto': engine default.")
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)] | Auto = Field(
        "auto", description="Scales the default learning rate. 'auto': 1.0.")
    learning_rate: Annotated[float, Field(gt=0, le=10.0)] | None = Field(
        None, description="Absolute learning rate; overrides the multiplier. Default: engine default.")
    max_seq_len: Annotated[int, Field(ge=8)] | None = Field(
        None, description="Longest training example in tokens (≤ max_prompt_tokens + max_completion_tokens).")
    eval_every: Annotated[int, Field(ge=1, le=MAX_EVAL_EVERY)] | None = Field(
        None, description="Steps between validation passes. Default: engine default.")


class SupervisedHyperparameters(_Strict):
    """OpenAI's supervised hyperparameters (the alias accepts exactly these)."""

    n_epochs: Annotated[int, Field(ge=1)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)] | Auto = "auto"


class LengthSearch(_Strict):
    search: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, max_length=16, description="Candidate prefix lengths, trained packed and halved")


class PrefixSpec(_Strict):
    num_virtual_tokens: Annotated[int, Field(ge=1)] | Auto | LengthSearch | None = Field(
        None, description="Prefix length P (≤ settings.max_num_virtual_tokens); \"auto\" or {\"search\": [...]} "
        "searches it (docs/LENGTH_SEARCH.md). Default: engine default.")
    length_search_tolerance: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="A search picks the shortest length within this relative margin of the best "
        "validation loss. Default 0.02.")
    prefix_projection: bool | None = Field(
        None, description="Train through Li & Liang's reparameterisation MLP. Default: engine default.")
    projection_hidden_size: Annotated[int, Field(ge=1, le=MAX_PROJECTION_HIDDEN)] | None = None
    init: Literal["random", "text", "adapter"] | None = Field(
        None, description="random | text (activations of init_text) | adapter (continue init_adapter).")
    init_text: Annotated[str, Field(min_length=1, max_length=MAX_INIT_TEXT_CHARS)] | None = Field(
        None, description="init 'text': the text whose activations start the prefix. Default: the first "
                          "training example.")
    init_adapter: Annotated[str, Field(min_length=1, max_length=255, pattern=ID_RE)] | None = Field(
        None, description="Id of one of your adapters trained on the same base.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class BaseSpec(_Strict):
    architecture: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="Architecture of a new base (a preset of app.ml.config.PRESETS).")
    size: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="Size preset of a new base.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class SupervisedSpec(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class PrefixMethod(_Strict):
    type: Literal["prefix"]
    prefix: PrefixSpec = Field(default_factory=PrefixSpec)


class BaseMethod(_Strict):
    type: Literal["base"]
    base: BaseSpec = Field(default_factory=BaseSpec)


class SupervisedMethod(_Strict):
    type: Literal["supervised"]
    supervised: SupervisedSpec = Field(default_factory=SupervisedSpec)


Method = Annotated[PrefixMethod | BaseMethod | SupervisedMethod, Field(discriminator="type")]

FileId = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_RE)]


class JobCreate(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=255, pattern=ID_RE)] = Field(
        description="A base id (prefix jobs and continued base training), or 'scratch' for a new base.")
    training_file: FileId
    validation_file: FileId | None = None
    suffix: str | None = Field(None, description="Up to 40 characters of [a-z0-9-], part of the new model's id.")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 string pairs (keys ≤ 64 chars, values ≤ 512 chars).")
    method: Method | None = Field(None, description="Default: {'type': 'prefix'}.")
    hyperparameters: SupervisedHyperparameters | None = Field(
        None, description="Deprecated OpenAI field; only valid without 'method' (or with 'supervised').")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not SUFFIX_RE.match(v):
            raise ValueError("suffix must be 1 to 40 characters of [a-z0-9-]")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        for k, val in v.items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return v


class SpecError(ValueError):
    """A bad request, with the parameter path it names (e.g. `method.prefix.init_text`)."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status_code, self.code = message, param, status_code, code


def loc_to_param(loc) -> str | None:
    """Pydantic location -> dotted parameter path, without union branch tags."""
    loc = list(loc)
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    # a discriminated union repeats the tag: ('method', 'prefix', 'prefix', ...) -> method.prefix...
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in ("prefix", "base", "supervised"):
        del loc[1]
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [str(p)]
            continue
        s = str(p)
        # branch tags pydantic adds inside plain unions: 'constrained-int', "literal['auto']", 'int', ...
        if s in ("int", "float", "str", "bool", "none") or s.startswith(("literal[", "constrained-", "function-")):
            continue
        parts.append(s)
    return ".".join(parts) or None


def _first_error(e: ValidationError) -> SpecError:
    errs = e.errors()
    first = errs[0]
    param = loc_to_param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        msg = f"Unknown parameter: '{param}'"
    elif first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'"
    else:
        msg = f"Invalid value for '{param}': {first.get('msg')}"
    return SpecError(msg, param)


def parse_job_create(body) -> JobCreate:
    """Validate a request body; raises `SpecError` naming the first bad parameter."""
    if not isinstance(body, dict):
        raise SpecError("The request body must be a JSON object", None)
    try:
        return JobCreate.model_validate(body)
    except ValidationError as e:
        raise _first_error(e) from None


def normalize_method(req: JobCreate) -> dict:
    """The request's method as stored: `{"type": "prefix"|"base", "<type>": {...}}`, with unset
    fields left None / "auto" (resolved when the job starts)."""
    method = req.method
    if req.hyperparameters is not None and method is not None and not isinstance(method, SupervisedMethod):
        raise SpecError("'hyperparameters' (deprecated) cannot be combined with method "
                        f"'{method.type}'; put them in method.{method.type}.hyperparameters", "hyperparameters")
    if method is None or isinstance(method, SupervisedMethod):
        hp = Hyperparameters()
        sources = []
        if method is not None:
            sources.append(method.supervised.hyperparameters)
        if req.hyperparameters is not None:
            sources.append(req.hyperparameters)
        for src in sources:
            hp = hp.model_copy(update=src.model_dump(exclude_unset=True))
        return {"type": "prefix", "prefix": PrefixSpec(hyperparameters=hp).model_dump()}
    if isinstance(method, PrefixMethod):
        return {"type": "prefix", "prefix": method.prefix.model_dump()}
    return {"type": "base", "base": method.base.model_dump()}


def check_limits(method: dict, settings: Settings) -> None:
    """Setting-based limits and cross-field rules, each a `SpecError` naming its parameter."""
    kind = method["type"]
    spec = method[kind]
    where = f"method.{kind}"
    hp = spec["hyperparameters"]
    hpw = f"{where}.hyperparameters"
    if isinstance(hp.get("n_epochs"), int) and hp["n_epochs"] > settings.max_n_epochs:
        raise SpecError(f"n_epochs must be at most {settings.max_n_epochs} (settings.max_n_epochs), "
                        f"got {hp['n_epochs']}", f"{hpw}.n_epochs")
    max_len = settings.max_prompt_tokens + settings.max_completion_tokens
    if hp.get("max_seq_len") is not None and hp["max_seq_len"] > max_len:
        raise SpecError(f"max_seq_len must be at most {max_len} (max_prompt_tokens + max_completion_tokens), "
                        f"got {hp['max_seq_len']}", f"{hpw}.max_seq_len")
    if kind != "prefix":
        return
    p = spec.get("num_virtual_tokens")
    if isinstance(p, dict):
        if any(n > settings.max_num_virtual_tokens for n in p["search"]):
            raise SpecError(f"every searched length must be at most {settings.max_num_virtual_tokens} "
                            f"(settings.max_num_virtual_tokens), got {p['search']}", f"{where}.num_virtual_tokens")
    elif isinstance(p, int) and p > settings.max_num_virtual_tokens:
        raise SpecError(f"num_virtual_tokens must be at most {settings.max_num_virtual_tokens} "
                        f"(settings.max_num_virtual_tokens), got {p}", f"{where}.num_virtual_tokens")
    init = spec.get("init")
    if init == "adapter" and not spec.get("init_adapter"):
        raise SpecError("init 'adapter' needs init_adapter", f"{where}.init_adapter")
    if spec.get("init_text") is not None and init != "text":
        raise SpecError("init_text is only used with init 'text'", f"{where}.init_text")
    if spec.get("init_adapter") is not None and init != "adapter":
        raise SpecError("init_adapter is only used with init 'adapter'", f"{where}.init_adapter")
    if spec.get("projection_hidden_size") is not None and spec.get("prefix_projection") is False:
        raise SpecError("projection_hidden_size needs prefix_projection true", f"{where}.projection_hidden_size")
