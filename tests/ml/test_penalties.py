"""presence_penalty, frequency_penalty and logit_bias (OpenAI's definitions): known values, greedy
rows take the argmax of their penalised logits, a row's tokens depend on its own tokens only (alone
== in a mixed batch, neighbours unchanged), and logprobs stay the model's raw distribution."""

from __future__ import annotations

import pytest
import torch

from app.ml.base import load_base
from app.ml.generate import DecodeBatch, GenerationRequest, TokenLogprob, _Row, check_request, generate, score

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tiny_base_dirs):
    return load_base(tiny_base_dirs["gpt2"])


def test_offset_known_values(base):
    """logits[j] += bias[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty."""
    req = GenerationRequest([1], max_tokens=10, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={7: 2.0, 3: -1})
    row = _Row(0, req, base.tokenizer, "cpu")
    off = row.logit_offset(20, "cpu")
    assert off[7] == 2.0 and off[3] == -1.0 and int((off != 0).sum()) == 2
    for tok in (3, 3, 5, 3):
        row.advance(tok, False)
    expect = torch.zeros(20)
    expect[7], expect[3], expect[5] = 2.0, -1.0 - 3 * 0.3 - 0.5, -0.3 - 0.5
    assert torch.allclose(off, expect)


def _reference(base, req: GenerationRequest) -> list[int]:
    """Greedy from scratch: a full forward each step, OpenAI's penalties applied by hand."""
    ids, out = list(req.prompt_ids), []
    with torch.no_grad():
        for _ in range(req.max_tokens):
            logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for j, b in (req.logit_bias or {}).items():
                logits[j] += b
            for j in set(out):
                logits[j] -= out.count(j) * req.frequency_penalty + req.presence_penalty
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
    return out


def test_greedy_rows_take_the_argmax_of_their_penalised_logits(base):
    plain = GenerationRequest(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    free = generate(base, [plain])[0].token_ids
    assert len(set(free)) < len(free), "the base repeats itself: without that the penalties would show nothing"
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -2.0},
               {"frequency_penalty": 1.0, "presence_penalty": 0.5, "logit_bias": {free[0]: -100}}):
        req = GenerationRequest(PROMPT, max_tokens=8, temperature=0, ignore_eos=True, **kw)
        got = generate(base, [req])[0].token_ids
        assert got == _reference(base, req), kw
    assert generate(base, [GenerationRequest(PROMPT, max_tokens=8, temperature=0, ignore_eos=True,
                                             frequency_penalty=2.0)])[0].token_ids != free


def test_rows_alone_equal_rows_in_a_mixed_batch(base):
    def reqs():
        return [
            GenerationRequest(PROMPT, max_tokens=8, temperature=0, ignore_eos=True),
            GenerationRequest([40, 41], max_tokens=8, temperature=0, ignore_eos=True, frequency_penalty=1.5),
            GenerationRequest([12, 13], max_tokens=8, temperature=0.9, seed=3, ignore_eos=True),
            GenerationRequest(PROMPT, max_tokens=8, temperature=0.9, seed=4, ignore_eos=True, presence_penalty=2.0,
                              logit_bias={11: 5.0}),
            GenerationRequest([100, 3], max_tokens=8, temperature=0.9, seed=5, top_p=0.8, ignore_eos=True,
                              frequency_penalty=-1.0, logprobs=2),
        ]

    together = generate(base, reqs())
    for i, req in enumerate(reqs()):
        alone = generate(base, [req])[0]
        assert together[i].token_ids == alone.token_ids, i
    # the penalised rows changed their own tokens, and nothing else's
    unshaped = [GenerationRequest(r.prompt_ids, max_tokens=8, temperature=r.temperature, seed=r.seed, top_p=r.top_p,
                                  ignore_eos=True) for r in reqs()]
    plain = generate(base, unshaped)
    assert [together[i].token_ids for i in (0, 2)] == [plain[i].token_ids for i in (0, 2)]
    assert any(together[i].token_ids != plain[i].token_ids for i in (1, 3, 4))


def test_logit_bias_forces_and_bans_tokens(base):
    forced = generate(base, [GenerationRequest(PROMPT, max_tokens=5, temperature=t, seed=1, ignore_eos=True,
                                               logit_bias={42: 100}) for t in (0, 1.0)])
    assert all(r.token_ids == [42] * 5 for r in forced)
    top = generate(base, [GenerationRequest(PROMPT, max_tokens=1, temperature=0)])[0].token_ids[0]
    banned = generate(base, [GenerationRequest(PROMPT, max_tokens=1, temperature=0, logit_bias={top: -100})])[0]
    assert banned.token_ids[0] != top


def test_logprobs_report_the_raw_distribution(base):
    """A biased row's logprobs are the model's, not the biased distribution's it chose from."""
    (res,) = generate(base, [GenerationRequest(PROMPT, max_tokens=1, temperature=0, logprobs=3,
                                               logit_bias={42: 100}, presence_penalty=1.0)])
    (lp,) = res.logprobs
    assert isinstance(lp, TokenLogprob) and lp.token_id == 42
    assert lp.logprob == pytest.approx(score(base, PROMPT, [[42]])[0], abs=1e-4)
    assert lp.logprob < -1  # under the raw distribution, not the ~0 of the biased one
    plain = generate(base, [GenerationRequest(PROMPT, max_tokens=1, temperature=0, logprobs=3)])[0].logprobs[0]
    assert [t for t, _, _ in lp.top] == [t for t, _, _ in plain.top]


def test_the_unshaped_path_builds_no_offsets(base):
    batch = DecodeBatch(base)
    batch.add([GenerationRequest(PROMPT, max_tokens=3, temperature=0), GenerationRequest(PROMPT, max_tokens=3)])
    batch.step()
    assert all(row.offset is None for row in batch.rows)


@pytest.mark.parametrize("kw,match", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {10**7: 1}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
])
def test_out_of_range_values_are_refused(base, kw, match):
    with pytest.raises(ValueError, match=match):
        check_request(base, GenerationRequest([1], **kw))


def test_a_shaped_row_that_goes_bad_fails_alone(base):
    """Row-fault isolation holds with shaped rows: a penalised row whose logits go NaN fails, and
    its shaped and plain neighbours take the tokens they take without it."""
    from app.ml.generate import GenerationFailedError
    from tests.ml.test_row_faults import hostile_prefix

    def neighbours():
        return [GenerationRequest(PROMPT, max_tokens=6, temperature=0, ignore_eos=True, frequency_penalty=1.0),
                GenerationRequest([40, 41], max_tokens=6, temperature=0.9, seed=2, ignore_eos=True,
                                  presence_penalty=1.0, logit_bias={9: 3.0})]

    def run(reqs):
        batch, out = DecodeBatch(base), {}
        batch.add(reqs, list(range(len(reqs))))
        while len(batch):
            for key, result in batch.step():
                out[key] = result if isinstance(result, GenerationFailedError) else result.token_ids
        return out

    alone = run(neighbours())
    bad = GenerationRequest([1, 2], prefix=hostile_prefix(base, float("nan")), max_tokens=6, temperature=0.7,
                            seed=1, frequency_penalty=0.5)
    n = neighbours()
    out = run([n[0], bad, n[1]])
    assert isinstance(out[1], GenerationFailedError)
    assert [out[0], out[2]] == [alone[0], alone[1]]
