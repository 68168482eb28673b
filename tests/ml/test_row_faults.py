"""One row's fault fails that row alone: its neighbours in the decode batch finish with exactly the
tokens they get without it. Faults come from sampling parameters, from a hostile prefix whose
logits go NaN, from a sampler that raises for one row, and from a forward that fails for one row,
so clamping the parameters alone cannot pass these tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app.ml.generate as gen
from app.ml.base import load_base
from app.ml.generate import (
    MIN_TEMPERATURE,
    MIN_TOP_P,
    DecodeBatch,
    GenerationFailedError,
    GenerationRequest,
    check_request,
    generate,
)
from app.ml.kvcache import ModelGeometry
from app.ml.prefix import PrefixConfig, PrefixEncoder

PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [100, 3, 77, 9], [12, 13, 14], [60, 61, 62, 63], [7, 7, 8]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def base(tiny_base_dirs):
    return load_base(tiny_base_dirs["llama"])


def neighbours():
    """Greedy and seeded sampling rows: what must not change."""
    return [GenerationRequest(list(p), max_tokens=MAX_TOKENS, ignore_eos=True,
                              temperature=0 if i % 2 == 0 else 0.9, top_p=0.9 if i % 3 == 0 else 1.0, seed=i)
            for i, p in enumerate(PROMPTS)]


def run(base, requests):
    """{index: token ids or the GenerationFailedError} of one DecodeBatch over `requests`."""
    batch = DecodeBatch(base)
    batch.add(requests, list(range(len(requests))))
    out = {}
    while len(batch):
        for key, result in batch.step():
            out[key] = result if isinstance(result, GenerationFailedError) else result.token_ids
    return out


@pytest.fixture(scope="module")
def alone(base):
    return run(base, neighbours())


def with_faulty_middle_row(base, faulty: GenerationRequest):
    """The neighbours with `faulty` in the middle of the batch; returns (its outcome, theirs)."""
    reqs = neighbours()
    mid = len(reqs) // 2
    out = run(base, reqs[:mid] + [faulty] + reqs[mid:])
    rest = [out[k] for k in sorted(out) if k != mid]
    return out[mid], dict(enumerate(rest))


def hostile_prefix(base, value: float):
    g = ModelGeometry.of(base.model.config)
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=3)
    enc = PrefixEncoder(cfg)
    enc.set_table(torch.full((3, cfg.table_width), value))
    return enc.key_values()


@pytest.mark.parametrize("value", [float("nan"), 3e38])  # 3e38: finite, as an import accepts, but q·k overflows
def test_a_prefix_whose_logits_go_bad_fails_its_row_alone(base, alone, value):
    prefix = hostile_prefix(base, value)
    faulty = GenerationRequest([1, 2, 3], prefix=prefix, max_tokens=MAX_TOKENS)
    mine, theirs = with_faulty_middle_row(base, faulty)
    assert isinstance(mine, GenerationFailedError) and "not finite" in str(mine)
    assert theirs == alone


def test_a_sampler_that_raises_for_one_row_fails_that_row_alone(base, alone, monkeypatch):
    real = gen.sample_tokens

    def faulty_sampler(logits, requests, uniforms):
        if any(r.seed == 666 for r in requests):
            raise RuntimeError("injected sampling fault")
        return real(logits, requests, uniforms)

    monkeypatch.setattr(gen, "sample_tokens", faulty_sampler)
    mine, theirs = with_faulty_middle_row(base, GenerationRequest([9, 9], max_tokens=MAX_TOKENS, temperature=1.0,
                                                                  seed=666))
    assert isinstance(mine, GenerationFailedError) and "injected sampling fault" in str(mine)
    assert theirs == alone  # the sampling rows drew the same uniforms in the retry


def test_a_forward_that_fails_for_one_row_fails_that_row_alone(base, alone):
    """The decode forward raises whenever the poisoned token is fed; only the row that produced it
    (a row that wants a token the embedding rejects) leaves, and the step runs again without it."""
    reqs = neighbours()
    seen = {t for ids in alone.values() for t in ids} | {t for p in PROMPTS for t in p}
    poison = next(t for t in range(base.model.config.vocab_size) if t not in seen | gen.eos_token_ids(base))
    emb = base.model.get_input_embeddings()

    def hook(_module, args):
        ids = args[0]
        if ids.shape[1] == 1 and bool((ids == poison).any()):
            raise IndexError("injected embedding fault")

    handle = emb.register_forward_pre_hook(hook)
    try:
        mid = len(reqs) // 2
        batch = DecodeBatch(base)
        batch.add(reqs[:mid] + [GenerationRequest([3, 4], max_tokens=MAX_TOKENS)] + reqs[mid:],
                  list(range(len(reqs) + 1)))
        j = batch.keys.index(mid)  # rows are ordered by prompt length
        batch.logits = batch.logits.clone()
        batch.logits[j] = -1e4
        batch.logits[j, poison] = 0.0  # its first token is the poison
        out = {}
        while len(batch):
            for key, result in batch.step():
                out[key] = result if isinstance(result, GenerationFailedError) else result.token_ids
    finally:
        handle.remove()
    assert isinstance(out[mid], GenerationFailedError) and "injected embedding fault" in str(out[mid])
    rest = [out[k] for k in sorted(out) if k != mid]
    assert dict(enumerate(rest)) == alone


def test_a_token_outside_the_vocabulary_fails_its_row_alone(base, alone):
    """A head wider than the embedding (a padded vocabulary) can pick an id the model cannot embed."""
    reqs = neighbours()
    mid = len(reqs) // 2
    top = gen._embeddable_ids(base.model) - 1
    assert all(top not in ids for ids in alone.values())
    batch = DecodeBatch(base)
    batch.add(reqs[:mid] + [GenerationRequest([3, 4], max_tokens=MAX_TOKENS)] + reqs[mid:], list(range(len(reqs) + 1)))
    batch.vocab = top  # pretend the embedding ends below the head's last id
    batch.logits = batch.logits.clone()
    batch.logits[batch.keys.index(mid), top] = 1e4
    out = {}
    while len(batch):
        for key, result in batch.step():
            out[key] = result if isinstance(result, GenerationFailedError) else result.token_ids
    assert isinstance(out[mid], GenerationFailedError) and "outside the model's vocabulary" in str(out[mid])
    assert dict(enumerate(out[k] for k in sorted(out) if k != mid)) == alone


def test_tiny_temperatures_decode_greedily_and_tiny_top_p_is_refused(base):
    greedy = generate(base, [GenerationRequest([5, 6, 7], max_tokens=6, temperature=0)])[0].token_ids
    for t in (1e-300, 5e-324, 1e-40, MIN_TEMPERATURE / 2):
        tiny_t = GenerationRequest([5, 6, 7], max_tokens=6, temperature=t, seed=1)
        assert generate(base, [tiny_t])[0].token_ids == greedy
    # at the bound sampling is well defined, even for logits far larger than a model's
    big = torch.tensor([[3e3, 2.9e3, -3e3]])
    req = GenerationRequest([1], temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P)
    assert gen.sample_tokens(big, [req], torch.tensor([0.5])) == [0]
    for p in (MIN_TOP_P / 10, 0.0, -1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            check_request(base, GenerationRequest([1], top_p=p))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=st.one_of(st.floats(0, 2), st.sampled_from([1e-300, 5e-324, 1e-38, 1e-45, MIN_TEMPERATURE])),
    top_p=st.one_of(st.floats(MIN_TOP_P, 1), st.sampled_from([MIN_TOP_P, 1e-7, 1.0])),
    top_k=st.integers(0, 300),
    seed=st.integers(0, 2**31),
)
def test_no_sampling_parameters_change_a_neighbour(base, alone, temperature, top_p, top_k, seed):
    faulty = GenerationRequest([2, 3, 4], max_tokens=4, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    mine, theirs = with_faulty_middle_row(base, faulty)
    assert theirs == alone
    if not isinstance(mine, GenerationFailedError):
        assert 1 <= len(mine) <= 4 and all(0 <= t < base.model.config.vocab_size for t in mine)  # EOS may end it
