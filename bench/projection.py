"""The vocabulary projection of a decode step: the engine's W·Hᵀ against the model's H·Wᵀ.

    python -m bench.projection [--quick]

The last stdout line is JSON with `engine_vs_model`: per number of rows, the time of
`F.linear(H, W)` (what the model's `lm_head` computes) over the time of
`app.ml.generate.vocab_logits` (the same products as `W @ Hᵀ`, transposed back to a contiguous
float `[rows, V]`), on the `default` base's head and its real last hidden states, side by side,
best of N; and `max_abs_difference` between the two. The BLAS picks its kernels by shape, so the
ratio depends on the CPU. On the 2-core AMD EPYC of 2026-11-30 (AVX2, MKL), three runs: 1.7-3.4x at
32 rows, 1.3-2.5x at 64, 0.99-1.78x at 1 and 8 rows. The model's form was also the unsteady one (1.2
to 2.5 ms at 32 rows from run to run, the engine's 0.69-0.81 ms).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from app.ml.generate import split_head, vocab_logits
from bench.common import best_time, emit, limit_mrs, load_e2e, log
from bench.mixed_prefix import _load_or_build_base

ROWS = (1, 8, 32, 64)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no base training if none is cached")
    args = ap.parse_args(argv)
    repeats = 50 if args.quick else 300
    base, base_desc = _load_or_build_base(args.quick)
    parts = split_head(base.model)
    if parts is None:
        raise SystemExit("this base's forward is not backbone -> linear head; the engine uses the model's forward")
    backbone, head = parts
    mrs = list(dict.fromkeys(mr for mr, _ in limit_mrs(load_e2e(), max(ROWS))))[: max(ROWS)]
    with torch.inference_mode():
        # real states: the last hidden state of each E2E prompt
        hidden = torch.cat([backbone(input_ids=torch.tensor([base.tokenizer.encode(f"{mr} ->")]),
                                     use_cache=False).last_hidden_state[:, -1] for mr in mrs])
        ms, ratio, diff = {}, {}, 0.0
        for n in ROWS:
            h = hidden[:n].contiguous()
            diff = max(diff, float((vocab_logits(head, h) - F.linear(h, head.weight, head.bias)).abs().max()))
            model_s = engine_s = float("inf")
            for _ in range(3):  # interleaved, so drift hits both alike
                model_s = min(model_s, best_time(lambda h=h: F.linear(h, head.weight, head.bias), repeats // 3))
                engine_s = min(engine_s, best_time(lambda h=h: vocab_logits(head, h), repeats // 3))
            ms[str(n)] = {"model": round(model_s * 1e3, 4), "engine": round(engine_s * 1e3, 4)}
            ratio[str(n)] = round(model_s / engine_s, 2)
            log(f"{n} rows: model {model_s * 1e3:.3f} ms, engine {engine_s * 1e3:.3f} ms")
    result = {
        "bench": "projection",
        "base": base_desc,
        "vocab": head.weight.shape[0],
        "hidden": head.weight.shape[1],
        "threads": torch.get_num_threads(),
        "ms": ms,
        "engine_vs_model": ratio,
        "max_abs_difference": diff,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
