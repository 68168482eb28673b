"""Sampling cost in a 32-row decode batch: the vectorised sampler against per-row sampling.

    python -m bench.sampling [--quick]

The last stdout line is JSON with
- `vectorised_vs_per_row`: per setting, the time to pick 32 tokens from the same `[32, V]` logits
  with `app.ml.generate.sample_tokens` (one vectorised draw) over the time of the per-row sampler
  the engine used before (`torch.multinomial` and a full top-p sort per row, kept below as the
  baseline), side by side, best of N;
- `step_vs_greedy_step`: per setting, a whole decode step of 32 sampling rows (forward + sampling
  + detokenising) over a greedy step, on the same batch.
Settings: `t1` (temperature 1, what OpenAI clients send by default), `top_k` (0.8, 50), `top_p`
(0.8, 0.9). Base, prompts and adapters as in `bench.mixed_prefix` (the `default` base, 32 E2E
prompts, 32 random P=16 adapters); the logits are that batch's real next-token logits.
"""

from __future__ import annotations

import argparse

import torch

from app.ml.generate import DecodeBatch, GenerationRequest, draw_uniforms, sample_tokens
from app.ml.prefix import table_to_key_values
from bench.common import best_time, emit, limit_mrs, load_e2e, log
from bench.mixed_prefix import _adapter_tables, _load_or_build_base

SETTINGS = {"t1": dict(temperature=1.0), "top_k": dict(temperature=0.8, top_k=50),
            "top_p": dict(temperature=0.8, top_p=0.9)}


def per_row_sample(logits: torch.Tensor, req: GenerationRequest, generator: torch.Generator) -> int:
    """The engine's sampler before `sample_tokens`: one row at a time, a full sort for top_p."""
    x = logits / req.temperature
    if 0 < req.top_k < x.shape[-1]:
        kth = torch.topk(x, req.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= req.top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no base training if none is cached")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 20
    B, P = args.batch, 16
    base, base_desc = _load_or_build_base(args.quick)
    mrs = list(dict.fromkeys(mr for mr, _ in limit_mrs(load_e2e(), B)))[:B]
    prompts = [base.tokenizer.encode(f"{mr} ->") for mr in mrs]
    cfg, tables = _adapter_tables(base, B, P)
    prefixes = [table_to_key_values(t, cfg) for t in tables]

    def batch(settings: dict) -> DecodeBatch:
        b = DecodeBatch(base)
        b.add([GenerationRequest(p, prefix=x, max_tokens=200, ignore_eos=True, seed=i, **settings)
               for i, (p, x) in enumerate(zip(prompts, prefixes, strict=False))])
        for _ in range(3):
            b.step()
        return b

    logits = batch({"temperature": 0.0}).logits
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    sampling_ms, ratio, step_ms = {}, {}, {}
    greedy = batch({"temperature": 0.0})
    step_ms["greedy"] = best_time(greedy.step, repeats) * 1e3
    for name, settings in SETTINGS.items():
        reqs = [GenerationRequest([1], **settings)] * B
        vec = best_time(lambda reqs=reqs: sample_tokens(logits, reqs, draw_uniforms(gens)), repeats)
        row = best_time(lambda reqs=reqs: [per_row_sample(logits[i], reqs[i], gens[i]) for i in range(B)], repeats)
        sampling_ms[name] = {"vectorised": round(vec * 1e3, 3), "per_row": round(row * 1e3, 3)}
        ratio[name] = round(row / vec, 2)
        step_ms[name] = best_time(batch(settings).step, repeats) * 1e3
        log(f"{name}: sampling {vec * 1e3:.2f} ms vectorised, {row * 1e3:.2f} ms per row; step {step_ms[name]:.2f} ms")
    result = {
        "bench": "sampling",
        "base": base_desc,
        "batch": B,
        "vocab": int(logits.shape[-1]),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "sampling_ms": sampling_ms,
        "vectorised_vs_per_row": ratio,
        "step_ms": {k: round(v, 2) for k, v in step_ms.items()},
        "step_vs_greedy_step": {k: round(step_ms[k] / step_ms["greedy"], 2) for k in SETTINGS},
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
