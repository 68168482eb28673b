"""The CUDA paths: prefix training under bfloat16 autocast, mixed-prefix generation and bfloat16
serving on a GPU. Skipped where torch sees no CUDA device (CI has none); on a GPU machine run
`pytest tests/ml/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch

from app.ml.base import load_base, resolve_device, resolve_serving_dtype
from app.ml.config import PrefixTrainingConfig
from app.ml.data import encode_prompt
from app.ml.generate import GenerationRequest, generate
from app.ml.prefix import table_to_key_values
from app.ml.train import train_prefix
from tests.ml.test_generate import PROMPTS, _prefix
from tests.ml.test_train import FILL, make_learnable_base, task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _first_token_accuracy(base, table, pcfg, examples) -> float:
    """Share of prompts whose greedy first token is the label's first token (`label_accuracy` of
    test_train, through the device-aware `generate`)."""
    kv = None if table is None else table_to_key_values(table.to(base.device), pcfg)
    reqs = [GenerationRequest(encode_prompt(base.tokenizer, e.prompt), prefix=kv, max_tokens=1, temperature=0)
            for e in examples]
    firsts = [base.tokenizer(e.completion, add_special_tokens=False)["input_ids"][0] for e in examples]
    return sum(r.token_ids[0] == f for r, f in zip(generate(base, reqs), firsts, strict=False)) / len(examples)


def test_prefix_training_on_cuda_learns_in_bf16_autocast_and_leaves_the_base_as_it_was():
    base = make_learnable_base()  # what test_all_defaults_learn_word_to_label trains on the CPU
    base.model.to("cuda")
    base.device = torch.device("cuda")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    train, held = task(FILL[:12]), task(FILL[12:])
    torch.cuda.reset_peak_memory_stats()
    r = train_prefix(base, train, held, PrefixTrainingConfig(checkpoint_every=0))
    assert r.steps > 0 and not r.cancelled
    assert r.metrics["device"] == "cuda" and r.metrics["mixed_precision"] == "bf16"  # "auto" on CUDA
    # the stored table is float32 on the CPU, whatever the device it was trained on
    assert r.table.dtype == torch.float32 and r.table.device.type == "cpu" and torch.isfinite(r.table).all()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    tuned = _first_token_accuracy(base, r.table, r.prefix_config, held)
    zero = _first_token_accuracy(base, torch.zeros_like(r.table), r.prefix_config, held)
    assert tuned >= 0.6 and zero <= 0.1, (tuned, zero)
    assert torch.cuda.max_memory_allocated() < 2 * 1024**3  # a tiny base: no per-step caches kept


def test_mixed_prefix_batch_on_cuda_equals_rows_alone(tiny_base_dirs):
    base = load_base(tiny_base_dirs["llama"], device="cuda")
    prefixes = [_prefix(base, 3, 1), _prefix(base, 9, 2), None, _prefix(base, 5, 3)]
    prefixes = [None if p is None else [(k.cuda(), v.cuda()) for k, v in p] for p in prefixes]
    reqs = [
        GenerationRequest(p, prefix=x, max_tokens=6, temperature=0, logprobs=2)
        for p, x in zip(PROMPTS, prefixes, strict=False)
    ]
    batch = generate(base, reqs)
    for req, res in zip(reqs, batch, strict=False):
        alone = generate(base, [req])[0]
        for j, (a, b) in enumerate(zip(alone.token_ids, res.token_ids, strict=False)):
            # cuBLAS may pick another algorithm for another batch size: tokens agree up to a near
            # tie of the row's top two, and the log-probs agree closely
            assert abs(alone.logprobs[j].logprob - res.logprobs[j].logprob) < 1e-3
            if a != b:
                top = alone.logprobs[j].top
                assert top[0][2] - top[1][2] < 1e-3, (j, top)
                break
    sampled = [GenerationRequest(PROMPTS[0], prefix=prefixes[0], max_tokens=6, temperature=0.9, seed=7)] * 2
    a, b = generate(base, sampled)
    assert a.token_ids == b.token_ids  # a seeded CUDA generator per row


def test_bf16_serving_on_cuda_keeps_the_fingerprint_and_generates(tiny_base_dirs):
    device = resolve_device("cuda")
    dtype = resolve_serving_dtype("auto", device)
    assert dtype in (torch.bfloat16, torch.float16)
    fp32 = load_base(tiny_base_dirs["qwen2"])
    served = load_base(tiny_base_dirs["qwen2"], device=device, dtype=dtype)
    assert served.model.dtype == dtype and served.fingerprint == fp32.fingerprint
    prefix = [(k.to(device, dtype), v.to(device, dtype)) for k, v in _prefix(served, 4, 1)]
    res = generate(served, [GenerationRequest(PROMPTS[1], prefix=prefix, max_tokens=5, temperature=0, ignore_eos=True)])
    assert len(res[0].token_ids) == 5
