"""docs/EXTENSIONS.md names every place where our API goes beyond OpenAI's: each route OpenAI does
not have, and each request or response field that OpenAI's Python client (its types follow
OpenAI's spec) does not know. A field or route added without a line there fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# OpenAI's routes among ours (evals are OpenAI's too, whoever adds them here)
OPENAI_PATHS = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/v1/files",
    "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs",
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume",
}
OPENAI_PREFIXES = ("/v1/evals",)


def _fields(model) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__annotations__)


def _openai_fields() -> dict[str, set[str]]:
    """Our schema name -> the fields OpenAI's client knows for it."""
    from openai.types import (
        Completion,
        CompletionChoice,
        FileDeleted,
        FileObject,
        Model,
        ModelDeleted,
        completion_create_params,
    )
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.chat.chat_completion import Choice
    from openai.types.completion_choice import Logprobs
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent, job_create_params
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
    from openai.types.fine_tuning.supervised_hyperparameters_param import SupervisedHyperparametersParam

    page = {"object", "data", "has_more", "first_id", "last_id"}
    return {
        "FileObject": _fields(FileObject), "FileList": page, "FileDeleted": _fields(FileDeleted),
        "ModelObject": _fields(Model), "ModelList": {"object", "data"}, "ModelDeleted": _fields(ModelDeleted),
        "JobPublic": _fields(FineTuningJob), "JobList": page, "JobEventPublic": _fields(FineTuningJobEvent),
        "JobEventList": page, "JobCheckpointPublic": _fields(FineTuningJobCheckpoint), "JobCheckpointList": page,
        "JobCreate": _fields(job_create_params.JobCreateParams),
        "Hyperparameters": _fields(SupervisedHyperparametersParam),
        "SupervisedHyperparameters": _fields(SupervisedHyperparametersParam),
        "Completion": _fields(Completion), "CompletionChoice": _fields(CompletionChoice),
        "LegacyLogprobs": _fields(Logprobs),
        "CompletionCreate": _fields(completion_create_params.CompletionCreateParamsBase) | {"stream"},
        "ChatCompletion": _fields(ChatCompletion), "ChatChoice": _fields(Choice),
        "ChatMessageOut": _fields(ChatCompletionMessage),
        "ChatCompletionCreate": _fields(chat_params.CompletionCreateParamsBase) | {"stream"},
        # ours entirely: every field must be named
        "PrefixSpec": {"hyperparameters"}, "BaseSpec": {"hyperparameters"},
    }


@pytest.fixture(scope="module")
def spec(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("DATA_DIR", str(tmp_path_factory.mktemp("openapi")))
    from app.main import create_app

    return create_app().openapi()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def doc() -> set[str]:
    """The names in backticks in docs/EXTENSIONS.md, and each part of a dotted or routed name."""
    text = (ROOT / "docs" / "EXTENSIONS.md").read_text()
    names = set(re.findall(r"`([^`]+)`", text))
    words = {w for n in names for w in n.split()}  # `GET /v1/x` names the route /v1/x
    return names | words | {part for n in names for part in re.split(r"[^A-Za-z0-9_]+", n) if part}


def test_every_route_openai_lacks_is_documented(spec, doc):
    ours = [p for p in spec["paths"] if p not in OPENAI_PATHS and not p.startswith(OPENAI_PREFIXES)]
    assert ours, "no extension routes at all: the test would be vacuous"
    missing = [p for p in ours if p not in doc]
    assert not missing, f"routes OpenAI does not have, missing from docs/EXTENSIONS.md: {missing}"


def test_every_field_openai_lacks_is_documented(spec, doc):
    schemas = spec["components"]["schemas"]
    missing = {}
    for name, known in _openai_fields().items():
        extra = sorted(set(schemas[name].get("properties", {})) - known)
        if undocumented := [f for f in extra if f not in doc]:
            missing[name] = undocumented
    assert not missing, f"fields OpenAI's client does not know, missing from docs/EXTENSIONS.md: {missing}"
    # and the method types of our own
    assert {"prefix", "base", "supervised"} <= doc


def test_the_extension_fields_are_real(spec):
    """The check above sees what it must: our known extensions are there as fields."""
    props = {k: set(v.get("properties", {})) for k, v in spec["components"]["schemas"].items()}
    assert {"row_count", "token_count"} <= props["FileObject"] - _openai_fields()["FileObject"]
    assert {"kind", "num_virtual_tokens"} <= props["ModelObject"] - _openai_fields()["ModelObject"]
    assert {"learning_rate", "max_seq_len"} <= props["Hyperparameters"] - _openai_fields()["Hyperparameters"]
