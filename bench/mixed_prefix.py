"""Mixed-prefix batching: 32 requests with 32 different adapters in one batch, against the same
requests sharing one adapter, and against serving them one at a time with an adapter swap.

    python -m bench.mixed_prefix [--quick]

The last stdout line is JSON with `mixed_vs_shared` (target >= 0.9: a mixed batch costs about what
a single-adapter batch costs) and `mixed_vs_one_at_a_time` (target >= 10 on CPU), both ratios of
generated tokens per second, measured side by side in one run, modes interleaved: each round times
one one-at-a-time run and `--pairs` back-to-back mixed/shared pairs. `mixed_vs_shared` is the
median of the pairs' ratios; `mixed_vs_one_at_a_time` the ratio of the modes' median times
(`mixed_vs_one_at_a_time_best` of their best times, the estimator used before 2026-11-30 evening).

Base: the service's `default` base, built once by `build_default_base` and cached under
./var/bench/default. With --quick and no cached build, the same `default` preset untrained (same
shapes, so the same compute per token). The JSON says which. Every request generates exactly
`--new-tokens` tokens (ignore_eos), so the three modes do the same work.

Measured on the 4-KV-head default base (3.34M parameters, E2E prompts of 43.5 tokens on average),
torch's 2 threads. Machine speed drifts and each run takes its own ratio side by side.
- 2-core Intel with AVX-512/AMX (2026-11-30, morning): mixed_vs_shared 0.93-1.04,
  mixed_vs_one_at_a_time 9.0-10.6 over 13 runs (mixed 0.117-0.168 s, one at a time 1.06-1.57 s).
  A 32-row decode step ~6 ms (vocabulary projection ~0.6, attention ~0.7, the per-forward overhead
  of one row ~2.5); the prefill of 32 prompts (1,664 slots, 16% of them padding) ~45 ms.
  --dtype bfloat16 (AMX): mixed 0.127 s, but one at a time slows to 2.2 s (17.4; the single-row
  forwards are overhead bound and pay the conversions).
- 2-core AMD EPYC with AVX2 (2026-11-30, afternoon), best-of estimator: 10.1-12.5 over 11 runs
  once the engine projected logits as W·Hᵀ (bench.projection), 9.1-12.6 over 7 runs before;
  mixed_vs_shared 0.82-1.15 (40 runs of the same mixed batch spread from 0.29 to 0.47 s). With
  the median estimator, three runs: mixed_vs_one_at_a_time 11.51, 11.53, 10.85 (best-of in the same
  runs: 13.42, 13.1, 11.86), mixed_vs_shared 0.984, 0.970, 0.956; median times mixed 0.37-0.38 s,
  one at a time 4.16-4.37 s.
The batched steps are matmul bound and the single rows' steps mostly per-forward overhead, so a
leaner forward would help the single rows most: the ratio is set by the machine and the base's shape. With
--max-prompt-tokens 12 the prefill shrinks and the ratio grows (18 on the session-1 base).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from app.ml.base import load_base, resolve_device
from app.ml.config import BaseTrainingConfig
from app.ml.generate import GenerationRequest, generate
from app.ml.prefix import PrefixConfig, PrefixEncoder, table_to_key_values
from app.ml.pretrain import build_default_base
from bench.common import REPO, emit, limit_mrs, load_e2e, log

CACHE_DIR = Path(os.environ.get("BENCH_DIR", REPO / "var" / "bench"))


def _load_or_build_base(quick: bool, dtype: torch.dtype | None = None, device="cpu"):
    """(base, description), on `device`, in `dtype` (None: as stored, float32)."""
    trained = CACHE_DIR / "default"
    if (trained / "config.json").exists():
        return load_base(str(trained), device=device, dtype=dtype), "default"
    if not quick:
        log(f"building the default base into {trained} (a few minutes, once)")
        build_default_base(str(trained), seed=0, budget_s=None)  # the full preset, however busy the machine
        return load_base(str(trained), device=device, dtype=dtype), "default"
    untrained = CACHE_DIR / "default-untrained"
    if not (untrained / "config.json").exists():
        log(f"--quick: default preset, untrained, into {untrained}")
        build_default_base(str(untrained), seed=0, config=BaseTrainingConfig(steps=0))
    return load_base(
        str(untrained), device=device, dtype=dtype
    ), "default-preset-untrained (--quick, no cached default build)"


def _adapter_tables(base, n: int, P: int) -> tuple[PrefixConfig, list[torch.Tensor]]:
    """n distinct random prefix tables, as adapters store them (float32 `[P, width]`)."""
    g = base.geometry
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    tables = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        tables.append(PrefixEncoder(cfg).table.detach().clone())
    return cfg, tables


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no base training if none is cached")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=None, help="rounds: one one-at-a-time run each (default 8, --quick 2)"
    )
    ap.add_argument("--pairs", type=int, default=3, help="timed mixed/shared pairs per round")
    # E2E meaning representations average ~44 tokens; prefill is compute bound on CPU and batches
    # far less than decoding does, so the one-at-a-time ratio grows as prompts get shorter.
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="keep only the last N prompt tokens")
    # On a CPU shared with other jobs, OpenMP threads spin against each other: measured 8x slower
    # per forward with 2 threads than with 1 on an overloaded 2-core box. Pin threads for stable ratios.
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    # SERVING_DTYPE=bfloat16 on the CPU: bfloat16 matmuls run on AMX tiles where the CPU has them
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the dtype served in")
    # the target is for the CPU; on a GPU the same three modes show what batching buys there
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 8)
    B, P, N = args.batch, args.prefix_len, args.new_tokens

    base, base_desc = _load_or_build_base(args.quick, getattr(torch, args.dtype), resolve_device(args.device))
    dtype = next(base.model.parameters()).dtype
    mrs = [mr for mr, _ in limit_mrs(load_e2e(), B)]
    mrs = list(dict.fromkeys(mrs))[:B]
    prompts = [base.tokenizer.encode(f"{mr} ->") for mr in mrs]
    if args.max_prompt_tokens:
        prompts = [p[-args.max_prompt_tokens :] for p in prompts]
    cfg, tables = _adapter_tables(base, B, P)

    def kv(table):
        # the adapter swap: the stored table becomes per-layer key/values on the model's device
        return table_to_key_values(table.to(base.device), cfg, dtype)

    def requests(prefixes):
        return [
            GenerationRequest(p, prefix=x, max_tokens=N, temperature=0, ignore_eos=True)
            for p, x in zip(prompts, prefixes, strict=False)
        ]

    def mixed():
        return generate(base, requests([kv(t) for t in tables]))

    def shared():
        one = kv(tables[0])
        return generate(base, requests([one] * B))

    def one_at_a_time():
        out = []
        for p, t in zip(prompts, tables, strict=False):
            out += generate(base, [GenerationRequest(p, prefix=kv(t), max_tokens=N, temperature=0, ignore_eos=True)])
        return out

    # Medians, not best-of-N: on a machine whose speed varies from run to run (40 runs of the same
    # mixed batch spread from 0.29 to 0.47 s), the best of N short batched runs catches its quietest
    # moment while a 3-s one-at-a-time run averages over many, which flattered the batched modes;
    # and mixed vs shared, two equal costs, needs many pairs to settle.
    times: dict[str, list[float]] = {"mixed": [], "shared": [], "one_at_a_time": []}
    tokens = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        res = fn()
        times[name].append(time.perf_counter() - t0)
        tokens[name] = sum(x.completion_tokens for x in res)

    for r in range(repeats):
        one_at_a_time()  # an untimed run before each timed one
        timed("one_at_a_time", one_at_a_time)
        # untimed: whichever batched mode followed 512 single-row forwards ran 5-10% slower
        # (caches, OpenMP threads gone idle)
        mixed()
        pair = [("mixed", mixed), ("shared", shared)]
        for i in range(args.pairs):  # mixed and shared back to back, alternating which goes first
            for name, fn in pair if i % 2 == 0 else pair[::-1]:
                timed(name, fn)
        log(
            f"round {r + 1}/{repeats}: "
            + ", ".join(f"{k} median {statistics.median(v):.3f}s" for k, v in times.items())
        )
    median = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    pair_ratios = [
        s / m for m, s in zip(times["mixed"], times["shared"], strict=False)
    ]  # same tokens: a time ratio is a speed ratio
    params = sum(p.numel() for p in {id(p): p for p in base.model.parameters()}.values())
    result = {
        "bench": "mixed_prefix",
        "base": base_desc,
        "parameters": params,
        "device": str(base.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": B,
        "prefix_len": P,
        "new_tokens": N,
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "repeats": repeats,
        "runs": {k: len(v) for k, v in times.items()},
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "seconds_best": {k: round(v, 4) for k, v in best.items()},
        "tokens_per_s": {k: round(tokens[k] / v, 1) for k, v in median.items()},
        # the median of the mixed/shared pairs' ratios, and the ratio of medians (tokens/s)
        "mixed_vs_shared": round(statistics.median(pair_ratios), 3),
        "mixed_vs_one_at_a_time": round(
            (tokens["mixed"] / median["mixed"]) / (tokens["one_at_a_time"] / median["one_at_a_time"]), 2
        ),
        "mixed_vs_one_at_a_time_best": round(
            (tokens["mixed"] / best["mixed"]) / (tokens["one_at_a_time"] / best["one_at_a_time"]), 2
        ),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
