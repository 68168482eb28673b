"""The shared flow's answers to servers that lack something, on hand-written HTTP answers
(httpx.MockTransport: pure logic, no server). The real server is exercised end to end in
tests/integration/test_recipes.py."""

from __future__ import annotations

import json

import httpx
import pytest

from recipes import e2e, sst2
from recipes.common import Api, EvalItem, RecipeError, check_server, evaluate, start_job

MODELS = {"object": "list", "data": [{"id": "default", "object": "model"}, {"id": "ft:default:t:x:ftjob-1"}]}


def error(status: int, message: str, param: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                  "param": param, "code": None}})


def api(routes: dict[str, httpx.Response]) -> Api:
    def handler(request: httpx.Request) -> httpx.Response:
        return routes.get(request.url.path) or error(404, f"Unknown route: {request.method} {request.url.path}")

    return Api("http://server/v1", "sk-test", transport=httpx.MockTransport(handler))


def test_a_server_without_classify_is_named():
    with pytest.raises(RecipeError, match=r"this server lacks label scoring \(POST /v1/classify\)"):
        check_server(api({"/v1/models": httpx.Response(200, json=MODELS)}), sst2.RECIPE, "default")


def test_a_bare_framework_404_counts_as_a_missing_route():
    routes = {"/v1/models": httpx.Response(200, json=MODELS),
              "/v1/classify": httpx.Response(404, json={"detail": "Not Found"})}
    with pytest.raises(RecipeError, match="lacks label scoring"):
        check_server(api(routes), sst2.RECIPE, "default")


def test_a_server_without_stop_strings_is_named():
    routes = {"/v1/models": httpx.Response(200, json=MODELS),
              "/v1/completions": error(400, "Unrecognized request argument: stop", "stop")}
    with pytest.raises(RecipeError, match="lacks stop strings on /v1/completions"):
        check_server(api(routes), e2e.RECIPE, "default")


def test_a_server_without_completions_is_named():
    with pytest.raises(RecipeError, match=r"lacks text completion \(POST /v1/completions\)"):
        check_server(api({"/v1/models": httpx.Response(200, json=MODELS)}), e2e.RECIPE, "default")


def test_an_unknown_model_lists_the_bases():
    with pytest.raises(RecipeError, match=r"model 'smollm2' is not served here; bases: default$"):
        check_server(api({"/v1/models": httpx.Response(200, json=MODELS)}), e2e.RECIPE, "smollm2")


def test_a_server_without_prefix_jobs_is_named():
    routes = {"/v1/fine_tuning/jobs": error(400, "method.type: Input should be 'supervised' or 'dpo', not 'prefix'",
                                            "method.type")}
    with pytest.raises(RecipeError, match=r"lacks prefix-tuning jobs \(method.type 'prefix'\)"):
        start_job(api(routes), "default", "file-1", "x", 0, {})


def test_a_prompt_too_long_for_one_model_is_left_out_for_both():
    def handler(request: httpx.Request) -> httpx.Response:
        req = json.loads(request.content)
        if req["prompt"].startswith("long") and req["model"].startswith("ft:"):
            return error(400, "This model's maximum context length is 256 tokens ...", "prompt")
        return httpx.Response(200, json={"choices": [{"text": " yes", "index": 0}]})

    a = Api("http://server/v1", "k", transport=httpx.MockTransport(handler))
    items = [EvalItem("short =>", ["yes"]), EvalItem("long =>", ["no"])]
    scores, outputs, dropped = evaluate(a, {"adapter": "ft:x", "base": "default"}, e2e.RECIPE, items, max_tokens=4,
                                        concurrency=2)
    assert dropped == 1 and outputs == {"adapter": ["yes"], "base": ["yes"]}
    assert scores["adapter"]["rouge_l"] == scores["base"]["rouge_l"] == 1.0


def test_a_refused_key_says_so():
    routes = {"/v1/models": error(401, "Invalid API key")}
    with pytest.raises(RecipeError, match=r"the API key was refused \(401\): Invalid API key"):
        check_server(api(routes), e2e.RECIPE, "default")
