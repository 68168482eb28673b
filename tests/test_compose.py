"""CI has no Docker engine, so the compose file is checked against the compose-spec JSON schema
(vendored by check-jsonschema), not merely parsed as YAML."""

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema():
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def test_compose_file_matches_compose_spec():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(doc, _schema())
    assert {"api", "worker", "redis", "postgres", "minio"} <= set(doc["services"])
    gpu = doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_schema_check_rejects_a_broken_compose_file():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc["services"]["api"]["depends_on"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema())
