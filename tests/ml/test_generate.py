"""Mixed-prefix generation: every row equals itself alone and equals a from-scratch greedy loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app.ml.base import load_base
from app.ml.generate import (
    GenerationRequest,
    IncrementalDetokenizer,
    _nucleus,
    classify,
    draw_uniforms,
    generate,
    greedy_tokens,
    max_context,
    partial_stop_len,
    sample_tokens,
    score,
)
from app.ml.kvcache import FrozenPrefixCache, positions_from_mask
from app.ml.prefix import PrefixConfig, PrefixEncoder

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [40, 41],
    [100, 3, 77, 9],
    [12],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads on a shared CPU made
    these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bases(tiny_base_dirs):
    return {arch: load_base(path) for arch, path in tiny_base_dirs.items()}


def _prefix(base, P, seed, scale=8.0):
    """A random prefix, scaled up so that it visibly changes a tiny random model's output."""
    g = base.geometry
    torch.manual_seed(seed)
    enc = PrefixEncoder(PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P))
    with torch.no_grad():
        enc.set_table(enc.table * scale)
    return [(k.detach(), v.detach()) for k, v in enc.key_values()]


def _reference_greedy(base, prompt, prefix, max_tokens):
    """Recompute everything each step: full forward over prompt + generated, no growing cache."""
    model, eos = base.model, base.tokenizer.eos_token_id
    ids = list(prompt)
    P = 0 if prefix is None else prefix[0][0].shape[1]
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            L = len(ids)
            mask = torch.ones(1, P + L, dtype=torch.long)
            cache = FrozenPrefixCache([(k[None], v[None]) for k, v in prefix]) if prefix is not None else None
            logits = model(
                input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=positions_from_mask(mask, L),
                cache=cache, use_cache=False,
            ).logits
            t = int(logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t == eos:
                break
    return out


def _requests(base, **kw):
    prefixes = [_prefix(base, 3, 1), _prefix(base, 9, 2), None, _prefix(base, 5, 3)]
    return [GenerationRequest(p, prefix=x, **kw) for p, x in zip(PROMPTS, prefixes, strict=False)]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_greedy_matches_from_scratch_loop_and_rows_alone(bases, arch):
    base = bases[arch]
    reqs = _requests(base, max_tokens=6, temperature=0)
    batch = generate(base, reqs)
    changed = False
    for req, res in zip(reqs, batch, strict=False):
        ref = _reference_greedy(base, req.prompt_ids, req.prefix, req.max_tokens)
        assert res.token_ids == ref
        assert generate(base, [req])[0].token_ids == ref  # alone == in the mixed batch
        assert res.text == base.tokenizer.decode(ref, skip_special_tokens=True)
        assert res.prompt_tokens == len(req.prompt_ids) and res.completion_tokens == len(ref)
        assert res.finish_reason == ("stop" if ref[-1] == base.tokenizer.eos_token_id else "length")
        if req.prefix is not None and not changed:
            changed = _reference_greedy(base, req.prompt_ids, None, req.max_tokens) != ref
    assert changed, "the prefixes do not change the output: the test would be vacuous"


def test_sampling_seeded_per_row(bases):
    base = bases["llama"]
    reqs = _requests(base, max_tokens=8, temperature=0.9, top_p=0.95, top_k=50)
    for i, r in enumerate(reqs):
        r.seed = 100 + i
    batch = generate(base, reqs)
    for req, res in zip(reqs, batch, strict=False):
        assert generate(base, [req])[0].token_ids == res.token_ids  # neighbours don't matter
    again = generate(base, reqs)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]
    reqs[0].seed = 7
    assert generate(base, [reqs[0]])[0].token_ids != batch[0].token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(bases):
    base = bases["gpt2"]
    greedy = [r.token_ids for r in generate(base, _requests(base, max_tokens=5, temperature=0))]
    k1 = generate(base, _requests(base, max_tokens=5, temperature=1.5, top_k=1, seed=3))
    p0 = generate(base, _requests(base, max_tokens=5, temperature=1.5, top_p=1e-6, seed=3))
    assert [r.token_ids for r in k1] == greedy
    assert [r.token_ids for r in p0] == greedy


def _draws(logits, req, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([sample_tokens(logits[None], [req], draw_uniforms([g]))[0] for _ in range(n)])


def test_sample_tokens_follows_temperature_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    n = 4000  # a frequency's standard error is at most 0.008: 0.035 is over 4 of them

    def freq(req):
        return torch.bincount(_draws(logits, req, n), minlength=4).float() / n

    def close(req, expected):
        got = freq(req)
        assert (got - expected).abs().max() < 0.035, (req, got, expected)
        assert got[expected == 0].sum() == 0  # outside top-k / top-p: never

    close(GenerationRequest([1], temperature=1.0), probs)
    sharp = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    close(GenerationRequest([1], temperature=0.5), sharp)
    close(GenerationRequest([1], temperature=1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    # top_p 0.7: token 2 has 0.8 ranked above it, dropped; 0.85: kept
    close(GenerationRequest([1], temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    close(GenerationRequest([1], temperature=1.0, top_p=0.85), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    tiny = GenerationRequest([1], temperature=1.0, top_p=1e-6)
    assert _draws(logits, tiny, 50).eq(0).all()


def test_sample_tokens_rows_do_not_depend_on_their_neighbours():
    """Each row draws one uniform from its own generator: the same seed gives the same token
    whatever the rows around it and their settings."""
    V = 3000  # above the 1024-wide nucleus stage, so flat rows reach the sort
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=gen) * torch.tensor([0.1, 1.0, 4.0, 0.1, 8.0, 2.0])[:, None]
    reqs = [GenerationRequest([1], temperature=t, top_k=k, top_p=p)
            for t, k, p in [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 0, 0.95), (1.0, 0, 1.0), (0.9, 5, 0.5), (1.0, 0, 0.3)]]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(6)]
        batch = sample_tokens(logits, reqs, draw_uniforms(gens))
        alone = []
        for i in range(6):  # a fresh generator per row, seeded as in the batch
            row_gen = torch.Generator().manual_seed(seed * 10 + i)
            alone.append(sample_tokens(logits[i : i + 1], [reqs[i]], draw_uniforms([row_gen]))[0])
        assert batch == alone


@pytest.mark.parametrize("V", [5, 64, 300, 3000])
def test_nucleus_equals_the_sorted_definition(V):
    gen = torch.Generator().manual_seed(V)
    scales = torch.tensor([0.05, 0.5, 2.0, 6.0, 20.0])[:, None]  # flat to peaked: every stage
    probs = (torch.randn(5, V, generator=gen) * scales).softmax(-1)
    for p in (1e-6, 0.3, 0.9, 0.999):
        ps = torch.full((5,), p)
        vals, idx = probs.sort(-1, descending=True)
        ref = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, (vals.cumsum(-1) - vals) < p)
        assert torch.equal(_nucleus(probs, ps), ref)


def test_greedy_tokens_is_argmax_with_its_tie_rule():
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    logits[:32, 300] = logits[:32, 7] = 100.0  # ties: the first index wins, as with argmax
    assert torch.equal(greedy_tokens(logits).indices, logits.argmax(-1))
    assert greedy_tokens(logits).indices[:32].eq(7).all()
    assert int(greedy_tokens(logits[40]).indices) == int(logits[40].argmax())


def test_stop_string_cuts_text_and_stream_matches(bases):
    base = bases["gpt2"]
    reqs = _requests(base, max_tokens=10, temperature=0)
    full = generate(base, reqs)
    row = max(range(len(full)), key=lambda i: len(full[i].text))
    text = full[row].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = text.find(stop)
    reqs[row].stop = [stop, "\x00never"]
    streamed: dict[int, list[str]] = {}
    res = generate(base, reqs, on_token=lambda r, t, d, lp: streamed.setdefault(r, []).append(d))
    assert res[row].text == text[:cut] and res[row].finish_reason == "stop"
    assert stop not in res[row].text
    for i, r in enumerate(res):
        assert "".join(streamed[i]) == r.text  # what was streamed is exactly the final text
        assert len(streamed[i]) == len(r.token_ids)


def test_stop_prefix_is_held_back():
    assert partial_stop_len("hello wor", ["world"]) == 3
    assert partial_stop_len("hello", ["xyz"]) == 0
    assert partial_stop_len("ab", ["abc", "b"]) == 2


def test_incremental_detokenizer_multibyte(bases):
    tok = bases["gpt2"].tokenizer
    text = "héllo 世界 🙂 ok<|endoftext|>"
    ids = tok.encode(text)
    # the tiny byte-level vocabulary splits the CJK characters and the emoji across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, [5, 6])
    deltas = [detok.step(i) for i in ids] + [detok.flush()]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "héllo 世界 🙂 ok"  # and no special-token text


def test_streamed_logprobs_go_with_the_text_that_releases_them(bases):
    """A token's logprob goes out with the first delta that carries its text: bytes of a split
    character wait for the token that completes it, tokens of a possible stop string for the
    token that rules it out, and the last delta takes whatever is left."""
    from app.ml.generate import TokenLogprob, _Row

    tok = bases["gpt2"].tokenizer
    ids = tok.encode("a b 世界 ok")
    req = GenerationRequest([5, 6], max_tokens=len(ids), stop=[" b!"], logprobs=0)
    row = _Row(0, req, tok, "cpu")
    steps = []
    for i in ids:
        row.logprobs.append(TokenLogprob(i, tok.decode([i]), -1.0, []))  # as DecodeBatch.step scores it
        steps.append((row.advance(i, False), [lp.token_id for lp in row.released]))
    assert "".join(d for d, _ in steps) == "a b 世界 ok" and row.finish == "length"
    assert [t for _, ts in steps for t in ts] == ids  # each exactly once, in order
    assert all(d for d, ts in steps if ts)  # never without text of theirs
    held = [k for k, (d, _) in enumerate(steps) if d == " b"]  # " b" waited for the next " "
    assert held and steps[held[0]][1] == ids[1:3]
    cjk = next(d for d, _ in steps if "世" in d)
    assert [tok.decode([t]) for t in dict(steps)[cjk]][1:] == [tok.decode([i]) for i in ids[4:7]]


def test_detokenizer_uses_the_rust_decode_only_where_it_is_the_same(bases):
    """The fast path (the `tokenizers` backend's decode) is taken for transformers' own fast
    tokenizers; a tokenizer whose Python `decode` differs keeps going through it."""
    from app.ml.generate import _backend_decoder

    tok = bases["llama"].tokenizer
    assert _backend_decoder(tok) is not None
    ids = tok.encode("héllo 世界 🙂 ok")
    detok = IncrementalDetokenizer(tok)
    assert "".join([detok.step(i) for i in ids] + [detok.flush()]) == tok.decode(ids, skip_special_tokens=True)

    class Shouting:  # not a transformers tokenizer: its own decode must be used
        def decode(self, ids, **kw):
            return tok.decode(ids, **kw).upper()

    assert _backend_decoder(Shouting()) is None
    detok = IncrementalDetokenizer(Shouting())
    assert "".join([detok.step(i) for i in ids] + [detok.flush()]) == "HÉLLO 世界 🙂 OK"


class _ForceEos(torch.nn.Module):
    """Wraps a model: from its `after`-th forward on, EOS wins; records batch sizes."""

    def __init__(self, model, eos, after):
        super().__init__()
        self.inner, self.eos, self.after, self.calls, self.batch_sizes = model, eos, after, 0, []
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kw):
        out = self.inner(**kw)
        self.calls += 1
        self.batch_sizes.append(kw["input_ids"].shape[0])
        if self.calls > self.after:
            out.logits[..., self.eos] += 1e4
        return out


def test_eos_stops_and_special_text_is_skipped(bases):
    base = bases["gpt2"]
    eos = base.tokenizer.eos_token_id
    wrapped = SimpleNamespace(**{**vars(base), "model": _ForceEos(base.model, eos, after=3)})
    res = generate(wrapped, _requests(base, max_tokens=10, temperature=0))
    for r in res:
        assert r.finish_reason == "stop" and r.token_ids[-1] == eos and r.completion_tokens <= 4
        assert "<|endoftext|>" not in r.text
    wrapped.model.calls = 0
    for r in generate(wrapped, _requests(base, max_tokens=6, temperature=0, ignore_eos=True)):
        assert r.finish_reason == "length" and r.token_ids[-3:] == [eos] * 3 and "<|endoftext|>" not in r.text


def test_finished_and_aborted_rows_leave_the_batch(bases):
    base = bases["llama"]
    eos = base.tokenizer.eos_token_id
    reqs = _requests(base, max_tokens=6, temperature=0)
    reqs[0].max_tokens, reqs[2].max_tokens = 2, 4
    plain = generate(base, reqs)
    wrapped = SimpleNamespace(**{**vars(base), "model": _ForceEos(base.model, eos, after=10**6)})
    seen = {1: 0}

    def on_token(row, tok, delta, logprob):
        seen[row] = seen.get(row, 0) + 1

    res = generate(wrapped, reqs, on_token=on_token, should_abort=lambda row: row == 1 and seen[1] >= 3)
    assert res[1].finish_reason == "abort" and len(res[1].token_ids) == 3
    assert res[1].token_ids == plain[1].token_ids[:3]
    for i in (0, 2, 3):
        assert res[i].token_ids == plain[i].token_ids and res[i].finish_reason == plain[i].finish_reason
    # prefill 4 rows; rows 0 (2 tokens), 1 (abort after 3) and 2 (4 tokens) drop out as they end
    if all(len(r.token_ids) == r.completion_tokens == q.max_tokens for r, q in zip(plain, reqs, strict=False)):
        assert wrapped.model.batch_sizes == [4, 4, 3, 2, 1, 1]


def test_logprobs_agree_with_score(bases):
    base = bases["qwen2"]
    reqs = _requests(base, max_tokens=4, temperature=0, logprobs=3)
    for req, res in zip(reqs, generate(base, reqs), strict=False):
        assert len(res.logprobs) == len(res.token_ids)
        for lp, t in zip(res.logprobs, res.token_ids, strict=False):
            assert lp.token_id == t and len(lp.top) == 3 and lp.top[0][0] == t  # greedy: chosen = top-1
            assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        total = sum(lp.logprob for lp in res.logprobs)
        assert abs(score(base, req.prompt_ids, [res.token_ids], req.prefix)[0] - total) < 1e-4


def test_logprobs_of_rows_asking_for_different_alternatives(bases):
    """One batched log_softmax and top-k serve rows asking for 3, 0, no and 1 alternatives; each
    row gets what it gets alone."""
    base = bases["llama"]
    reqs = _requests(base, max_tokens=3, temperature=0.9, seed=5)
    for r, k in zip(reqs, [3, 0, None, 1], strict=False):
        r.logprobs = k
    batch = generate(base, reqs)
    for req, res in zip(reqs, batch, strict=False):
        alone = generate(base, [req])[0]
        if req.logprobs is None:
            assert res.logprobs is None
            continue
        assert [len(lp.top) for lp in res.logprobs] == [req.logprobs] * len(res.token_ids)
        for a, b in zip(
            res.logprobs, alone.logprobs, strict=False
        ):  # values: the forward rounds a batch a little differently
            assert (a.token_id, a.token) == (b.token_id, b.token) and abs(a.logprob - b.logprob) < 1e-5
            assert [t[:2] for t in a.top] == [t[:2] for t in b.top]
            assert all(abs(x[2] - y[2]) < 1e-5 for x, y in zip(a.top, b.top, strict=False))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_equals_single_row_forward(bases, arch):
    base = bases[arch]
    prefix = _prefix(base, 6, 11)
    prompt, cands = [5, 9, 33, 2], [[17], [40, 41, 42], [8, 8]]
    got = score(base, prompt, cands, prefix)
    for c, s in zip(cands, got, strict=False):
        ids = prompt + c
        mask = torch.ones(1, 6 + len(ids), dtype=torch.long)
        with torch.no_grad():
            logits = base.model(
                input_ids=torch.tensor([ids]),
                attention_mask=mask,
                position_ids=positions_from_mask(mask, len(ids)),
                cache=FrozenPrefixCache([(k[None], v[None]) for k, v in prefix]),
            ).logits[0]
        lp = logits.log_softmax(-1)
        manual = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(c))
        assert abs(manual - s) < 1e-4
    cls = classify(base, prompt, cands, prefix)
    assert abs(sum(p for _, p in cls) - 1) < 1e-6
    assert [lp for lp, _ in cls] == got
    assert score(base, prompt, cands, None) != got  # the prefix matters


def test_context_limit_and_edge_cases(bases):
    base = bases["gpt2"]
    assert max_context(base) == 256
    with pytest.raises(ValueError, match=r"200 tokens.*40 virtual.*\(20\) = 260 exceeds .* 256"):
        generate(base, [GenerationRequest([5] * 200, prefix=_prefix(base, 40, 0), max_tokens=20)])
    with pytest.raises(ValueError):
        generate(base, [GenerationRequest([], max_tokens=2)])
    assert generate(base, []) == []
    res = generate(base, [GenerationRequest([5, 6], max_tokens=0), GenerationRequest([7], max_tokens=2, temperature=0)])
    assert res[0].finish_reason == "length" and res[0].token_ids == [] and res[1].completion_tokens >= 1


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_rows_joining_a_running_batch_equal_rows_alone(bases, arch):
    """Continuous batching: rows prefilled while others decode (shorter and longer than the running
    cache, other prefix lengths, no prefix) produce the same greedy tokens as each row alone."""
    from app.ml.generate import DecodeBatch

    base = bases[arch]
    reqs = {
        "a": GenerationRequest([5, 6, 7], prefix=_prefix(base, 3, 1), max_tokens=9, temperature=0),
        "b": GenerationRequest([40, 41], max_tokens=4, temperature=0),
        # joins after 2 steps with a longer prompt and prefix than the running cache holds
        "c": GenerationRequest(
            [100, 3, 77, 9, 12, 13, 14, 15, 16, 17], prefix=_prefix(base, 9, 2), max_tokens=6, temperature=0
        ),
        # joins after 5 steps (b has left) with a short prompt and a short prefix
        "d": GenerationRequest([12], prefix=_prefix(base, 2, 3), max_tokens=5, temperature=0),
        "e": GenerationRequest([8, 9], max_tokens=3, temperature=0),
    }
    joins = {0: ["a", "b"], 2: ["c"], 5: ["d", "e"]}
    batch, got, streamed = DecodeBatch(base), {}, {}
    for step in range(40):
        if step in joins:
            assert batch.add([reqs[k] for k in joins[step]], joins[step]) == []
        if not len(batch) and step > max(joins):
            break
        got.update(batch.step(on_token=lambda k, t, d, lp: streamed.setdefault(k, []).append(t)))
    assert set(got) == set(reqs)
    for k, req in reqs.items():
        alone = generate(base, [req])[0]
        assert got[k].token_ids == alone.token_ids == streamed[k], k
        assert got[k].text == alone.text and got[k].finish_reason == alone.finish_reason


def test_rows_with_the_same_prompt_and_prefix_share_one_prefill(bases):
    """The n choices of one request (same prompt, same prefix object) are prefilled once; each
    still decodes on its own and equals its run alone."""
    base = bases["llama"]
    prefix = _prefix(base, 4, 1)
    reqs = [GenerationRequest(PROMPTS[0], prefix=prefix, max_tokens=6, temperature=1.5, seed=s) for s in (1, 2, 3)]
    reqs += [
        GenerationRequest(PROMPTS[1], prefix=prefix, max_tokens=6, temperature=0),
        GenerationRequest(PROMPTS[0], prefix=None, max_tokens=6, temperature=0),
    ]  # no prefix: another row
    rows_per_forward = []
    generate(base, reqs[-1:])  # the engine's first call checks the model's head on a short input
    hook = base.model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        batch = generate(base, reqs)
    finally:
        hook.remove()
    assert rows_per_forward[0] == (3, max(len(PROMPTS[0]), len(PROMPTS[1])))  # 3 distinct prefills for 5 rows
    assert all(shape[0] == 5 for shape in rows_per_forward[1:3])  # then all 5 rows decode
    for req, res in zip(reqs, batch, strict=False):
        assert generate(base, [req])[0].token_ids == res.token_ids
    assert len({tuple(r.token_ids) for r in batch[:3]}) > 1  # the copies sample on their own


def test_dropped_rows_leave_and_the_rest_go_on(bases):
    from app.ml.generate import DecodeBatch

    base = bases["llama"]
    reqs = _requests(base, max_tokens=6, temperature=0)
    batch = DecodeBatch(base)
    assert batch.add(reqs[:2] + [GenerationRequest([7], max_tokens=0)], ["x", "y", "z"]) == [
        ("z", generate(base, [GenerationRequest([7], max_tokens=0)])[0])
    ]
    batch.step()
    dropped = dict(batch.drop(["x"]))
    assert dropped["x"].finish_reason == "abort" and len(dropped["x"].token_ids) == 1 and batch.keys == ["y"]
    batch.add(reqs[2:], ["u", "v"])
    got = {}
    while len(batch):
        got.update(batch.step())
    for k, req in zip("yuv", reqs[1:], strict=False):
        assert got[k].token_ids == generate(base, [req])[0].token_ids


def test_prefill_groups_split_only_costly_padding():
    from app.ml.generate import prefill_groups

    assert prefill_groups([]) == []
    assert prefill_groups([5, 3, 4]) == [[1, 2, 0]]  # little padding: one forward, shortest first
    lengths = [10] * 30 + [400]  # one long prompt would pad 30 short ones to 400 tokens
    assert prefill_groups(lengths) == [list(range(30)), [30]]
    groups = prefill_groups([3, 300, 5, 310, 4, 290] * 4)
    assert sorted(i for g in groups for i in g) == list(range(24)) and len(groups) == 2


def test_rows_of_very_different_lengths_equal_rows_alone(bases, monkeypatch):
    """Prefilled in separate length groups and merged: each row still computes what it does alone."""
    from app.ml import generate as gen

    base = bases["llama"]
    short = [
        GenerationRequest([7 + i, 8], prefix=_prefix(base, 2 + i, i), max_tokens=4, temperature=0) for i in range(3)
    ]
    long = [
        GenerationRequest(
            list(range(20, 20 + 90 + i)), prefix=_prefix(base, 3, 9) if i else None, max_tokens=4, temperature=0
        )
        for i in range(3)
    ]
    reqs = [short[0], long[0], short[1], long[1], short[2], long[2]]
    monkeypatch.setattr(gen, "PAD_WASTE_MIN_TOKENS", 0)  # so that this small batch splits
    assert len(gen.prefill_groups([len(r.prompt_ids) for r in reqs])) == 2
    batch = generate(base, reqs)
    for req, res in zip(reqs, batch, strict=False):
        assert res.token_ids == generate(base, [req])[0].token_ids


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_engine_projects_logits_itself_only_where_that_equals_the_model(tiny_base_dirs, arch):
    """The engine computes the vocabulary projection itself (W·Hᵀ on the backbone's states) for
    the three families; a model whose forward does more after its head (here it halves the
    logits) keeps its own forward, so the engine's logits stay the model's."""
    from app.ml.generate import last_logits, split_head

    base = load_base(tiny_base_dirs[arch])
    ids = torch.tensor([[0] + PROMPTS[1], PROMPTS[0][-3:]])  # the first row left-padded
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 3), use_cache=False)
    with torch.no_grad():
        expected = base.model(**inputs).logits[:, -1]
        assert split_head(base.model) is not None
        assert torch.allclose(last_logits(base.model, **inputs), expected, rtol=1e-4, atol=1e-5)

        assert split_head(load_base(tiny_base_dirs[arch], dtype=torch.bfloat16).model) is not None  # any dtype

        other = load_base(tiny_base_dirs[arch])  # a new model object: the check is cached per model
        plain_forward = other.model.forward

        def halved(*args, **kwargs):
            out = plain_forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

        other.model.forward = halved
        assert split_head(other.model) is None
        assert torch.allclose(last_logits(other.model, **inputs), expected * 0.5, rtol=1e-4, atol=1e-5)
