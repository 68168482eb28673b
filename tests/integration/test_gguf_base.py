"""A GGUF base through a real API process: BASE_MODEL=<tiny Llama>.gguf is converted once,
registered and served (completions; chat through the template read from the GGUF); the admin
registers more bases from server paths (bad input: 400 naming the path and why, still serving
what it served); /v1/models lists the served base first, and serving switches between bases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.gguf_tiny import make_tiny_gguf, write_non_llm_gguf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def _ids(client):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return [(m["id"], m["served"]) for m in r.json()["data"]]


def test_gguf_base_model_is_served_and_admin_registers_more_bases(start_service, tiny_gguf, tiny_base_dirs,
                                                                  tmp_path):
    from transformers import AutoTokenizer

    from app.ml.data import encode_prompt, format_chat

    svc = start_service(env={"BASE_MODEL": tiny_gguf[1]})
    assert svc.wait_ready(120)["status"] == "ready"
    converted = svc.data_dir / "models" / "tiny-llama"
    assert (converted / "config.json").is_file() and list(converted.glob("*.safetensors"))
    t = svc.make_tenant()
    assert _ids(t.client)[0] == ("tiny-llama", True)

    r = t.client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "The quick brown",
                                               "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 5

    # chat renders with the template the GGUF carries (tokenizer.chat_template), not the fallback
    messages = [{"role": "user", "content": "name: Aromi | food: Chinese"}]
    r = t.client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages,
                                                    "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template
    templated = len(encode_prompt(tok, format_chat(messages, tok)))
    assert templated != len(encode_prompt(tok, format_chat(messages, None)))
    assert r.json()["usage"]["prompt_tokens"] == templated

    # tenants never name paths
    r = t.client.post("/v1/admin/bases", json={"path": tiny_base_dirs["qwen2"]})
    assert r.status_code in (401, 403), r.text

    data = Path(tiny_gguf[1]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    write_non_llm_gguf(tmp_path / "clip.gguf")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    shutil.copy(Path(tiny_base_dirs["llama"]) / "config.json", empty)
    for path, reason in [
        (tmp_path / "nowhere.gguf", "no such file or directory"),
        (tmp_path / "cut.gguf", "unreadable or truncated GGUF"),
        (tmp_path / "clip.gguf", "GGUF architecture 'clip' is not a causal LM"),
        (empty, "the directory has no weights"),
    ]:
        r = svc.admin.post("/v1/admin/bases", json={"path": str(path)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert str(path) in err["message"] and reason in err["message"], err
        assert err["code"] == "invalid_base" and err["param"] == "path" and err["type"] == "invalid_request_error"
    assert svc.admin.get("/v1/admin/serving").json()["model"] == "tiny-llama"

    r = svc.admin.post("/v1/admin/bases", json={"path": tiny_base_dirs["qwen2"], "id": "qwen-small"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "qwen-small" and r.json()["kind"] == "base" and not r.json()["served"]
    r = svc.admin.post("/v1/admin/bases", json={"path": tiny_base_dirs["qwen2"], "id": "qwen-small"})
    assert r.status_code == 200, r.text  # the same weights again: nothing new
    r = svc.admin.post("/v1/admin/bases", json={"path": tiny_gguf[1], "id": "qwen-small"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_id_taken", r.text
    listed = _ids(t.client)
    assert listed[0] == ("tiny-llama", True) and ("qwen-small", False) in listed  # registering changes nothing

    r = svc.admin.post("/v1/admin/serving", json={"model": "qwen-small"})
    assert r.status_code == 200 and r.json()["model"] == "qwen-small", r.text
    assert _ids(t.client)[0] == ("qwen-small", True)
    r = t.client.post("/v1/completions", json={"model": "qwen-small", "prompt": "The", "max_tokens": 2,
                                               "temperature": 0})
    assert r.status_code == 200, r.text
    r = svc.admin.post("/v1/admin/serving", json={"model": "tiny-llama"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama", r.text
