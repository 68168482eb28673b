"""`prompt_logprobs` (OpenAI's echo): each prompt token's log-probability given what precedes it,
under a prefix or none, agrees with the scorer and with the decoder's own logprobs."""

import math

import pytest

from app.ml.base import load_base
from app.ml.generate import GenerationRequest, generate, prompt_logprobs, score
from tests.ml.test_generate import _prefix


@pytest.fixture(scope="module")
def base(tiny_base_dirs):
    return load_base(tiny_base_dirs["llama"])


@pytest.mark.parametrize("with_prefix", [False, True])
def test_prompt_logprobs_agree_with_the_scorer_and_the_decoder(base, with_prefix):
    prefix = _prefix(base, 5, 1) if with_prefix else None
    context, continuation = [5, 6, 7, 8], [40, 41, 9]
    entries = prompt_logprobs(base, context + continuation, prefix, top=3)
    assert len(entries) == 7 and entries[0].logprob is None and entries[0].top is None
    assert [e.token_id for e in entries] == context + continuation
    summed = sum(e.logprob for e in entries[len(context):])
    assert math.isclose(summed, score(base, context, [continuation], prefix)[0], rel_tol=1e-4, abs_tol=1e-4)
    # the decoder's logprob of its first token after the prompt is the echo's of that token appended
    out = generate(base, [GenerationRequest(context, prefix=prefix, max_tokens=1, temperature=0, logprobs=3)])[0]
    again = prompt_logprobs(base, context + out.token_ids, prefix, top=3)[-1]
    assert math.isclose(again.logprob, out.logprobs[0].logprob, abs_tol=1e-4)
    assert [t for t, _, _ in again.top] == [t for t, _, _ in out.logprobs[0].top]
    assert all(e.top[0][2] >= e.logprob - 1e-6 for e in entries[1:])  # the top alternative is the most likely


def test_a_one_token_prompt_has_only_the_null_entry(base):
    (only,) = prompt_logprobs(base, [5])
    assert only.token_id == 5 and only.logprob is None
