"""ServingEngine over a real tiny base and the real mixed-prefix generate: concurrent requests with
different adapters share one batch, and each row equals what it gets alone."""

import asyncio

import pytest
import torch

from app.config import Settings
from app.ml.adapter import Adapter, adapter_from_bytes, adapter_to_bytes
from app.ml.base import load_base
from app.ml.generate import DecodeBatch, GenerationRequest, generate
from app.ml.prefix import PrefixConfig
from app.serving.engine import ServingEngine, load_served_base


def random_adapter(base, P, seed):
    g = base.geometry
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(P, cfg.table_width, generator=gen)
    return Adapter.from_table(table, cfg, base.fingerprint)


def recording(adds: list):
    """A DecodeBatch factory that records (rows already running, rows joining) per admission."""

    class Recording(DecodeBatch):
        def add(self, requests, keys=None):
            adds.append((len(self), len(requests)))
            return super().add(requests, keys)

    return Recording


@pytest.fixture(scope="module")
def base(tiny_base_dirs):
    return load_base(tiny_base_dirs["llama"])


def test_mixed_adapters_batched_together_and_equal_solo(base):
    blobs = {"a1": adapter_to_bytes(random_adapter(base, 4, 1)), "a2": adapter_to_bytes(random_adapter(base, 7, 2))}
    batches = []
    engine = ServingEngine(Settings(batch_window_ms=200, max_batch_size=16), batch_factory=recording(batches),
                           adapter_loader=lambda key: adapter_from_bytes(blobs[key]))
    engine.start(lambda: ("tiny", base))
    assert engine.wait_ready(10)
    tok = base.tokenizer
    prompts = ["name: Aromi | food:", "The quick brown", "label: positive", "abc"]
    prefixes = [engine.prefix_for("m1", "a1"), engine.prefix_for("m2", "a2"), None, engine.prefix_for("m1", "a1")]
    assert engine.cache.hits == 1 and engine.cache.misses == 2
    reqs = [
        GenerationRequest(prompt_ids=tok(p)["input_ids"], prefix=(pf.key_values if pf else None), max_tokens=6 + i,
                          temperature=0 if i % 2 == 0 else 0.8, seed=i)
        for i, (p, pf) in enumerate(zip(prompts, prefixes, strict=False))
    ]

    async def main():
        handles = [engine.submit_generation(f"tenant{i % 2}", [r], stream=(i == 0)) for i, r in enumerate(reqs)]
        return await asyncio.gather(*(h.results() for h in handles))

    results = [r[0] for r in asyncio.run(main())]
    engine.stop()
    assert batches == [(0, 4)]  # one shared batch with two adapters and no adapter
    for req, res in zip(reqs, results, strict=False):
        solo = generate(base, [req])[0]
        assert res.token_ids == solo.token_ids and res.text == solo.text


def test_mismatched_adapter_refused(base):
    other = random_adapter(base, 3, 3)
    other.metadata["base_fingerprint"] = "somebody-else"
    from app.ml.adapter import AdapterMismatchError

    engine = ServingEngine(Settings(), adapter_loader=lambda key: other)
    engine.set_base("tiny", base)
    with pytest.raises(AdapterMismatchError):
        engine.prefix_for("x", "k")
    assert "x" not in engine.cache


def test_a_request_joining_mid_batch_streams_the_same_tokens_as_alone(base):
    blobs = {"a1": adapter_to_bytes(random_adapter(base, 5, 4)), "a2": adapter_to_bytes(random_adapter(base, 9, 5))}
    adds = []
    engine = ServingEngine(Settings(batch_window_ms=1, max_batch_size=8), batch_factory=recording(adds),
                           adapter_loader=lambda key: adapter_from_bytes(blobs[key]))
    engine.start(lambda: ("tiny", base))
    assert engine.wait_ready(10)
    tok = base.tokenizer
    first = GenerationRequest(tok("The quick brown")["input_ids"], prefix=engine.prefix_for("m1", "a1").key_values,
                              max_tokens=40, temperature=0, ignore_eos=True)
    joiner = GenerationRequest(tok("name: Aromi | food: Chinese | area:")["input_ids"],
                               prefix=engine.prefix_for("m2", "a2").key_values, max_tokens=8, temperature=0)

    async def main():
        h1 = engine.submit_generation("A", [first], stream=True)
        tokens1 = [(await h1.next_event(10))[2] for _ in range(3)]  # first is decoding
        h2 = engine.submit_generation("B", [joiner], stream=True)
        tokens2, res2 = [], None
        async for ev in h2.events():
            if ev[0] == "token":
                tokens2.append(ev[2])
            elif ev[0] == "done":
                res2 = ev[2]
        async for ev in h1.events():
            if ev[0] == "token":
                tokens1.append(ev[2])
            elif ev[0] == "done":
                res1 = ev[2]
        return tokens1, res1, tokens2, res2

    tokens1, res1, tokens2, res2 = asyncio.run(main())
    engine.stop()
    assert adds[0] == (0, 1) and adds[1] == (1, 1)  # the second row joined the running one
    assert res1.finish_reason == "length" and len(res1.token_ids) == 40  # still running when it joined
    assert tokens1 == res1.token_ids == generate(base, [first])[0].token_ids
    assert tokens2 == res2.token_ids == generate(base, [joiner])[0].token_ids


def test_a_row_that_cannot_run_fails_alone(base):
    """A row whose prefill fails (here: longer than the context) is admitted in the same gathering
    window as good rows; it fails, they run and equal their solo runs."""
    adds = []
    engine = ServingEngine(Settings(batch_window_ms=200, max_batch_size=8), batch_factory=recording(adds))
    engine.start(lambda: ("tiny", base))
    assert engine.wait_ready(10)
    good = [GenerationRequest([5, 6, 7], max_tokens=4, temperature=0),
            GenerationRequest([9], max_tokens=3, temperature=0)]
    bad = GenerationRequest([5] * 300, max_tokens=4, temperature=0)

    async def main():
        hs = [engine.submit_generation("A", [good[0]]), engine.submit_generation("B", [bad]),
              engine.submit_generation("C", [good[1]])]
        return await asyncio.gather(*(h.results() for h in hs), return_exceptions=True)

    r0, rbad, r1 = asyncio.run(main())
    engine.stop()
    assert isinstance(rbad, ValueError) and "exceeds the model's context" in str(rbad)
    assert adds[0] == (0, 3)  # tried together first
    assert r0[0].token_ids == generate(base, [good[0]])[0].token_ids
    assert r1[0].token_ids == generate(base, [good[1]])[0].token_ids


def test_serving_dtype_and_device_settings(base, tiny_base_dirs):
    """SERVING_DTYPE=bfloat16 serves the same base (same fingerprint) in bfloat16, adapters
    converted on load; DEVICE naming a GPU this machine lacks is reported, not served on the CPU."""
    blobs = {"a1": adapter_to_bytes(random_adapter(base, 4, 1))}
    engine = ServingEngine(Settings(serving_dtype="bfloat16", device="cpu"),
                           adapter_loader=lambda key: adapter_from_bytes(blobs[key]))
    served = engine.switch_base("tiny", tiny_base_dirs["llama"])
    assert served.base.model.dtype == torch.bfloat16 and served.fingerprint == base.fingerprint
    prefix = engine.prefix_for("m1", "a1").key_values
    assert prefix[0][0].dtype == torch.bfloat16
    engine.start()
    req = GenerationRequest(prompt_ids=base.tokenizer("name: Aromi | food:")["input_ids"], prefix=prefix,
                            max_tokens=5, temperature=0, ignore_eos=True)

    async def main():
        return await engine.submit_generation("t", [req]).results()

    res = asyncio.run(main())[0]
    engine.stop()
    assert len(res.token_ids) == 5 and res.token_ids == generate(served.base, [req])[0].token_ids

    if not torch.cuda.is_available():
        gpu = ServingEngine(Settings(device="cuda"))
        with pytest.raises(ValueError, match="no CUDA device"):
            gpu.switch_base("tiny", tiny_base_dirs["llama"])
        gpu.start(lambda: ("tiny", load_served_base(Settings(device="cuda:1"), tiny_base_dirs["llama"])))
        assert not gpu.wait_ready(10) and "no CUDA device" in gpu.error
        gpu.stop()
