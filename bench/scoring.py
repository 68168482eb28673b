"""Scoring candidates (classification): the prompt prefilled once against once per candidate.

    python -m bench.scoring [--quick]

The last stdout line is JSON with `shared_prompt_vs_per_candidate`: per case, the time of the
per-candidate scorer the engine used before (every candidate re-runs prompt + candidate, one
left-padded batch, kept below as the baseline) over `app.ml.generate.score` (the prompt once; only
multi-token candidates run a second, shared forward), side by side, best of N, and the largest
difference between the two scores. Cases: 5 one-token labels and 5 labels of 1-6 tokens, after a
30- and a 150-token prompt, under a P=16 adapter on the `default` base.
"""

from __future__ import annotations

import argparse

import torch

from app.ml.generate import _pad_id, score
from app.ml.kvcache import FrozenPrefixCache, batch_prefixes, keeps_logits_by_mask, positions_from_mask
from app.ml.prefix import table_to_key_values
from bench.common import best_time, emit, load_e2e, log
from bench.mixed_prefix import _adapter_tables, _load_or_build_base

LABELS = {"one_token": [" positive", " negative", " neutral", " mixed", " unknown"],
          "multi_token": [" very positive", " rather negative", " neutral, mostly", " mixed", " unknown really"]}


@torch.inference_mode()
def per_candidate_score(base, prompt_ids, candidates, prefix) -> list[float]:
    """The engine's scorer before the shared prompt: one row per candidate, prompt + candidate."""
    model, device = base.model, base.device
    seqs = [list(prompt_ids) + list(c) for c in candidates]
    L, n, longest = max(map(len, seqs)), len(seqs), max(map(len, candidates))
    ids = torch.tensor([[_pad_id(base)] * (L - len(s)) + s for s in seqs], device=device)
    tmask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device)
    kv, pmask = batch_prefixes([prefix] * n, base.geometry, torch.float32, device)
    mask = torch.cat([pmask, tmask], 1)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    keep[:, L - longest - 1 :] = True
    by_mask = keeps_logits_by_mask(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, L),
                cache=FrozenPrefixCache(kv), logits_to_keep=keep if by_mask else longest + 1)
    logits = out.logits.view(n, longest + 1, -1) if by_mask else out.logits
    tok_lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, L - longest :, None])[..., 0]
    return [float(tok_lp[i, longest - len(c) :].sum()) for i, c in enumerate(candidates)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; no base training if none is cached")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 30
    base, base_desc = _load_or_build_base(args.quick)
    cfg, tables = _adapter_tables(base, 1, 16)
    prefix = table_to_key_values(tables[0], cfg)
    tok = base.tokenizer
    text_ids = tok.encode(" ".join(mr for mr, _ in load_e2e()[:8]))
    ratios, ms, diffs = {}, {}, {}
    for plen in (30, 150):
        prompt = text_ids[:plen]
        for kind, words in LABELS.items():
            labels = [tok.encode(w) for w in words]
            if kind == "one_token":
                labels = [x[:1] for x in labels]
            case = f"prompt{plen}_{kind}"
            shared = best_time(lambda prompt=prompt, labels=labels: score(base, prompt, labels, prefix), repeats)
            each = best_time(lambda prompt=prompt, labels=labels: per_candidate_score(base, prompt, labels, prefix),
                             repeats)
            ratios[case] = round(each / shared, 2)
            ms[case] = {"shared_prompt": round(shared * 1e3, 2), "per_candidate": round(each * 1e3, 2)}
            a, b = score(base, prompt, labels, prefix), per_candidate_score(base, prompt, labels, prefix)
            diffs[case] = max(abs(x - y) for x, y in zip(a, b, strict=False))
            log(f"{case} (label tokens {[len(x) for x in labels]}): {shared * 1e3:.2f} ms against {each * 1e3:.2f} ms")
    result = {
        "bench": "scoring",
        "base": base_desc,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "ms": ms,
        "shared_prompt_vs_per_candidate": ratios,
        "max_abs_score_difference": float(f"{max(diffs.values()):.2e}"),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
