"""Choosing the prefix length: candidates trained packed in one forward pass, successive halving.

Every candidate length gets its own prefix, its own AdamW state and the run's schedule. A training
row enters the base once per live candidate, each copy behind that candidate's prefix, so one
forward pass (one read of the base's weights, one batch) serves every candidate; rows of different
prefix lengths already mix in one batch (shorter prefixes are left-padded and masked). The losses
are summed for one backward: each candidate's parameters only see their own loss, so each follows
the trajectory it would follow alone, up to float rounding. Where K copies of a batch would not fit
(`max_packed_rows`), the candidates are split into groups, one forward each: the rows are chunked,
never the mathematics.

Successive halving: at each rung the better half of the live candidates by validation loss goes on.
Rungs sit at S/2^r, ..., S/4, S/2 of the run's S steps, so the search costs about 2-2.5 runs for 8
candidates, not 8. At the last rung the shortest length whose validation loss is within
`tolerance` (relative) of the best wins: a shorter prefix costs less memory and attention for every
request it serves afterwards. The winner trains on to the end of the run and is the job's adapter.

Docs: docs/LENGTH_SEARCH.md.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from app.ml.adapter import Adapter
from app.ml.callbacks import Progress, TrainingCallbacks
from app.ml.config import PrefixTrainingConfig, candidate_lengths  # noqa: F401  (part of this API)
from app.ml.data import IGNORE_INDEX, collate, sorted_batches, tokenize_example
from app.ml.kvcache import FrozenPrefixCache, ModelGeometry, keeps_logits_by_mask, positions_from_mask
from app.ml.prefix import PrefixConfig, PrefixEncoder
from app.ml.train import (
    TrainResult,
    _as_examples,
    _EpochBatches,
    _frozen_eval_mode,
    _make_encoder,
    _precision,
    _table_of,
    configure_optimizer,
)

DEFAULT_TOLERANCE = 0.02  # 2% of the best validation loss: within noise of a small validation set
DEFAULT_MAX_PACKED_ROWS = 256  # rows per forward pass before the candidates are split into groups


class LengthSearchError(ValueError):
    pass


def rung_steps(num_candidates: int, total_steps: int) -> list[int]:
    """Steps after which the live candidates are halved: S/2^r, ..., S/4, S/2 for r halvings (the
    halvings that take K candidates to one), never a step before the first."""
    r = math.ceil(math.log2(num_candidates)) if num_candidates > 1 else 0
    return sorted({max(1, total_steps >> (r - i)) for i in range(r)})


@dataclass
class Candidate:
    length: int
    config: PrefixTrainingConfig
    encoder: PrefixEncoder
    optimizer: torch.optim.Optimizer
    alive: bool = True
    valid_loss: float | None = None  # at the last rung it reached
    eliminated_at: int | None = None
    train_losses: list[float] = field(default_factory=list)  # one per step it trained


@dataclass
class LengthSearchResult:
    chosen: int
    curve: list[dict]  # per candidate: length, valid_loss (at its last rung), rung step, steps trained
    rungs: list[dict]  # per rung: step, live lengths with their losses, kept lengths
    result: TrainResult  # the chosen candidate's run, as `train_prefix` returns it
    base_rows: int  # row copies through the base (a row behind K prefixes counts K)
    base_tokens: int  # real tokens through the base, every copy counted
    train_losses: dict[int, list[float]]  # per length, the mean loss of each step it trained


def packed_losses(model, encoders: list[PrefixEncoder], geometry: ModelGeometry, batch, kv_dtype, amp_ctx,
                  keep_logits: bool) -> tuple[list[torch.Tensor], int]:
    """One forward pass: the batch once per encoder, each copy behind that encoder's prefix. Returns
    each encoder's summed label cross-entropy and the real tokens through the base (all copies)."""
    device = next(encoders[0].parameters()).device
    ids, tmask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    K, (B, L) = len(encoders), ids.shape
    p_max = max(e.config.num_virtual_tokens for e in encoders)
    kvs = [e.key_values() for e in encoders]
    layers = []
    for layer in range(geometry.num_layers):
        ks, vs = [], []
        for kv in kvs:  # left-pad each prefix to p_max, one expanded block of B rows per encoder
            k, v = kv[layer]
            pad = (0, 0, p_max - k.shape[1], 0)
            ks.append(F.pad(k.to(kv_dtype), pad).unsqueeze(0).expand(B, -1, -1, -1))
            vs.append(F.pad(v.to(kv_dtype), pad).unsqueeze(0).expand(B, -1, -1, -1))
        layers.append((torch.cat(ks), torch.cat(vs)))
    pmask = torch.cat([F.pad(torch.ones(B, e.config.num_virtual_tokens, dtype=torch.long, device=device),
                             (p_max - e.config.num_virtual_tokens, 0)) for e in encoders])
    full = torch.cat([pmask, tmask.repeat(K, 1)], dim=1)
    labels_k = labels.repeat(K, 1)
    kwargs = dict(input_ids=ids.repeat(K, 1), attention_mask=full, position_ids=positions_from_mask(full, L),
                  cache=FrozenPrefixCache(layers), use_cache=False)
    if keep_logits and keeps_logits_by_mask(model):
        predicts_label = labels_k[:, 1:] != IGNORE_INDEX
        kwargs["logits_to_keep"] = F.pad(predicts_label, (0, 1), value=False)
        with amp_ctx():
            logits = model(**kwargs).logits
        per_token = F.cross_entropy(logits.float(), labels_k[:, 1:][predicts_label], reduction="none")
        return list(per_token.view(K, -1).sum(1).unbind()), K * int(tmask.sum())
    with amp_ctx():
        logits = model(**kwargs).logits[:, :-1].float()
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_k[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return list(per_token.view(K, -1).sum(1).unbind()), K * int(tmask.sum())


def _groups(live: list[Candidate], rows: int, max_packed_rows: int) -> list[list[Candidate]]:
    per_group = max(1, max_packed_rows // max(1, rows))
    return [live[i : i + per_group] for i in range(0, len(live), per_group)]


def _step(model, live, geometry, micro_batches, pad_id, kv_dtype, amp_ctx, keep_logits, rate, max_grad_norm,
          max_packed_rows) -> tuple[list[float], int, int]:
    """One optimizer step of every live candidate. Returns their mean losses, rows and tokens."""
    n_labels = sum(x.num_label_tokens for items in micro_batches for x in items)
    for c in live:
        for g in c.optimizer.param_groups:
            g["lr"] = rate
        c.optimizer.zero_grad(set_to_none=True)
    sums, rows, tokens = [0.0] * len(live), 0, 0
    for items in micro_batches:
        batch = collate(items, pad_id)
        offset = 0
        for group in _groups(live, len(items), max_packed_rows):
            losses, ntok = packed_losses(model, [c.encoder for c in group], geometry, batch, kv_dtype, amp_ctx,
                                         keep_logits)
            (torch.stack(losses).sum() / n_labels).backward()
            for j, loss in enumerate(losses):
                sums[offset + j] += loss.item()
            offset += len(group)
            rows += len(group) * len(items)
            tokens += ntok
    for c in live:
        if max_grad_norm and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(c.encoder.parameters(), max_grad_norm)
        c.optimizer.step()
    return [s / n_labels for s in sums], rows, tokens


@torch.no_grad()
def _validation_losses(model, live, geometry, valid_tok, batch_size, pad_id, kv_dtype, amp_ctx, keep_logits,
                       max_packed_rows) -> list[float]:
    sums, n = [0.0] * len(live), 0
    for idx in sorted_batches([len(x) for x in valid_tok], batch_size):
        items = [valid_tok[i] for i in idx]
        batch, offset = collate(items, pad_id), 0
        for group in _groups(live, len(items), max_packed_rows):
            losses, _ = packed_losses(model, [c.encoder for c in group], geometry, batch, kv_dtype, amp_ctx,
                                      keep_logits)
            for j, loss in enumerate(losses):
                sums[offset + j] += loss.item()
            offset += len(group)
        n += sum(x.num_label_tokens for x in items)
    return [s / n for s in sums]


def _keep(live: list[Candidate], losses: list[float], last: bool, tolerance: float) -> list[Candidate]:
    """The better half by validation loss; at the last rung, the shortest within `tolerance`."""
    ranked = sorted(zip(live, losses, strict=True), key=lambda cl: (cl[1], cl[0].length))
    if last:
        best = ranked[0][1]
        within = [c for c, loss in ranked if loss <= best * (1 + tolerance)]
        return [min(within, key=lambda c: c.length)]
    return [c for c, _ in ranked[: math.ceil(len(ranked) / 2)]]


def search_prefix_length(base, train_examples, valid_examples, config: PrefixTrainingConfig, candidates: list[int],
                         *, tolerance: float = DEFAULT_TOLERANCE, callbacks: TrainingCallbacks | None = None,
                         max_packed_rows: int = DEFAULT_MAX_PACKED_ROWS) -> LengthSearchResult:
    """Train `candidates` (prefix lengths) packed under `config` (its `num_virtual_tokens` is ignored),
    halving them by validation loss; returns the chosen length, the curve and the winner's run."""
    callbacks = callbacks or TrainingCallbacks()
    candidates = sorted(set(candidates))
    if not candidates:
        raise LengthSearchError("no candidate lengths")
    model, tokenizer = base.model, base.tokenizer
    geometry = getattr(base, "geometry", None) or ModelGeometry.of(model.config)
    train_ex, valid_ex = _as_examples(train_examples, tokenizer), _as_examples(valid_examples, tokenizer)
    if not train_ex or (len(candidates) > 1 and not valid_ex):
        raise LengthSearchError("a length search needs training and validation examples")

    # -- the data (tokenized once, for the longest prefix) and the plan
    max_len = min(config.max_seq_len, geometry.max_positions - candidates[-1])
    train_tok = [tokenize_example(x, tokenizer, max_len) for x in train_ex]
    valid_tok = [tokenize_example(x, tokenizer, max_len) for x in valid_ex]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch, total_steps = config.steps_per_epoch(len(train_tok)), config.total_steps(len(train_tok))
    device = next(model.parameters()).device
    amp, kv_dtype, amp_ctx = _precision(config.mixed_precision, model, device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    rungs_at = rung_steps(len(candidates), total_steps)
    batches = _EpochBatches([len(x) for x in train_tok], config)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # -- the candidates: each initialised as a run of its own length would be
        pool = []
        for length in candidates:
            cfg = replace(config, num_virtual_tokens=length)
            torch.manual_seed(config.seed)
            with torch.no_grad():
                encoder = _make_encoder(cfg, geometry, base, train_ex, cfg.init).to(device)
            encoder.train()
            pool.append(Candidate(length, cfg, encoder, configure_optimizer(encoder, cfg)))

        # -- the loop: every live candidate steps on the same batches; halve at each rung
        live, rungs, base_rows, base_tokens = list(pool), [], 0, 0
        step, cancelled, t0 = 0, False, time.perf_counter()
        with _frozen_eval_mode(model, config.gradient_checkpointing):
            while step < total_steps:
                if callbacks.should_stop():
                    cancelled = True
                    break
                epoch, k = divmod(step, steps_per_epoch)
                micro = [[train_tok[i] for i in idx] for idx in batches.of_step(epoch, k)]
                losses, rows, tokens = _step(model, live, geometry, micro, pad_id, kv_dtype, amp_ctx, keep_logits,
                                             config.learning_rate_at(step, total_steps), config.max_grad_norm,
                                             max_packed_rows)
                for c, loss in zip(live, losses, strict=True):
                    c.train_losses.append(loss)
                step, base_rows, base_tokens = step + 1, base_rows + rows, base_tokens + tokens
                if step in rungs_at and len(live) > 1:
                    valid = _validation_losses(model, live, geometry, valid_tok, config.batch_size, pad_id, kv_dtype,
                                               amp_ctx, keep_logits, max_packed_rows)
                    kept = _keep(live, valid, last=len(live) <= 2, tolerance=tolerance)
                    for c, loss in zip(live, valid, strict=True):
                        c.valid_loss = loss
                        if c not in kept:
                            c.alive, c.eliminated_at = False, step
                    rungs.append({"step": step, "losses": {c.length: loss for c, loss in zip(live, valid, strict=True)},
                                  "kept": [c.length for c in kept]})
                    callbacks.on_search_rung(step, rungs[-1])
                    live = kept
                if step % config.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - t0
                    callbacks.on_progress(Progress(
                        step=step, total_steps=total_steps, epoch=epoch, train_loss=live[0].train_losses[-1],
                        valid_loss=live[0].valid_loss, tokens_per_s=base_tokens / elapsed if elapsed > 0 else 0.0,
                        eta_s=elapsed / step * (total_steps - step), trained_tokens=base_tokens))

        # -- the winner's final validation, and its result as `train_prefix` gives it
        winner = min(live, key=lambda c: c.length)  # one left, unless cancelled before the last rung
        if valid_tok and not cancelled:
            with _frozen_eval_mode(model, False):
                winner.valid_loss = _validation_losses(model, [winner], geometry, valid_tok, config.batch_size,
                                                       pad_id, kv_dtype, amp_ctx, keep_logits, max_packed_rows)[0]
        elapsed = time.perf_counter() - t0
    table = _table_of(winner.encoder)
    folded_cfg = PrefixConfig(**{**winner.encoder.config.to_dict(), "prefix_projection": False})
    metrics = {"train_loss": winner.train_losses[-1] if winner.train_losses else None,
               "valid_loss": winner.valid_loss, "total_steps": total_steps, "elapsed_s": elapsed,
               "tokens_per_s": base_tokens / elapsed if elapsed > 0 else 0.0, "device": device.type,
               "mixed_precision": amp}
    fingerprint = getattr(base, "fingerprint", None) or ""
    training = {"method": "prefix", **winner.config.to_dict(), "length_search": {"candidates": candidates,
                                                                                  "tolerance": tolerance}}
    adapter = Adapter.from_table(table, folded_cfg, fingerprint, training=training, metrics=metrics)
    curve = [{"num_virtual_tokens": c.length, "valid_loss": c.valid_loss, "eliminated_at_step": c.eliminated_at,
              "steps_trained": len(c.train_losses)} for c in pool]
    return LengthSearchResult(winner.length, curve, rungs, TrainResult(adapter, metrics, cancelled, step, table,
                                                                        folded_cfg), base_rows, base_tokens,
                              {c.length: c.train_losses for c in pool})
