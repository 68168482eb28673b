"""Prefix training speed and memory: our trainer against PEFT's `PrefixTuningConfig`, in one run.

    python -m bench.train_vs_peft [--quick]

Last line: JSON with `tokens_per_s_ratio`, `same_batches_ratio` (wall clock),
`cpu_tokens_per_s_ratio`, `cpu_same_batches_ratio`, `peak_mem_ratio` (the worst of the
architectures: min for speed, max for memory) and `per_arch` details. Targets: tokens/s ratio >= 1.2,
same-batches ratio >= 0.95, memory ratio <= 1.0. All ratios are ours / PEFT.

Setup, identical for both trainers:
- Bases: GPT-2 style and Llama style (GQA) models from `app.ml.config.PRESETS` (`app.ml.pretrain.model_config`),
  random init from a seed, with a byte-level BPE of the preset's vocabulary size trained on the
  E2E training texts; saved with `save_pretrained` and loaded by each trainer with
  `from_pretrained` (ours through `load_base`). Speed and memory do not depend on the weights.
- Data: `e2e/devset.csv` under `PREFIXD_DATA_ROOT` (default `../shared/data`), split by MR
  (`bench.common.split_by_mr`), train split.
  Prompt `"{mr}\\n"`, completion `ref` + EOS, tokenised by `app.ml.data.tokenize_example` for both,
  labels -100 on the prompt, so both losses count completion tokens and the EOS only.
- The same epochs, batch size, P, learning rate (AdamW, no weight decay, 6% linear warmup then
  cosine decay, gradient clipping at 1.0), and the projection MLP (`Embedding -> Linear(., 512) ->
  Tanh -> Linear`) on for both. No validation, no checkpoints.

The races (each trainer in its own spawned subprocess, run one after another, never at once):
1. `tokens_per_s_ratio`: each trainer batches its own way.
   - ours: `app.ml.train.train_prefix` as the service calls it (length-bucketed batches, left
     padding, logits only where labels are);
   - PEFT: `get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", ...))`, a plain training
     loop over a `DataLoader` of shuffled fixed-size batches, `DataCollatorForSeq2Seq` padding to
     the batch max (right padding, labels padded with -100), loss from `model(**batch).loss`: what
     a user writes (or what `Trainer` does) around PEFT.
2. `same_batches_ratio`: our step on PEFT's exact batches. The parent draws the shuffled fixed-size
   index batches once (seeded); the PEFT run of race 1 already trains on exactly these (its
   DataLoader takes them as `batch_sampler`). A third subprocess runs our training step on the same
   index batches in the same order: `app.ml.data.collate` (the same rows, the same padded length,
   padding on the left, our convention), `train._batch_loss` inside `train._frozen_eval_mode`, the
   encoder and AdamW built as `train_prefix` builds them (`configure_optimizer`), the config's
   `learning_rate_at` schedule, clipping, `loss.item()` per step: the body of `train_prefix`'s
   loop, minus the bucketing.
Clock: a user waits by the wall clock, so `tokens_per_s_ratio` and `same_batches_ratio` divide
wall-clock tokens/s, with every trainer run alone (one subprocess at a time, all cores). The ratios
by process CPU time (`cpu_tokens_per_s_ratio`, `cpu_same_batches_ratio`) stand beside them: other
load on a shared box inflates wall time but not CPU time. `--clock cpu` makes the CPU ratios the
headline and runs one thread per subprocess, the two architectures side by side.
Both races time the training loop only (batching and collation included; model load,
tokenisation and prefix init excluded), and count real tokens (attention mask 1), never padding.
Both trainers see the same examples, so the real token counts are equal. With `repeats` > 1 the
sequence (ours, PEFT, ours on PEFT's batches) runs again and each takes its median.

Peak memory (`peak_mem_ratio`): CPU: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the trainer's
subprocess, read right after its training loop. A baseline subprocess imports the same modules
(torch, transformers, peft, app.ml.train: every subprocess imports all of them, so import memory is
the same) and loads the model and the data, nothing else; `delta` = raw - baseline, what training
itself costs. The ratio is on the deltas (raw numbers and their ratio are reported too). CUDA:
`torch.cuda.max_memory_allocated` after training, minus the memory allocated after loading.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

MODES = {
    # `default` preset (~3.3M params, 8k vocabulary, 4 layers): a few minutes on 2 cores.
    "full": dict(
        preset="default",
        archs=("gpt2", "llama"),
        max_examples=1600,
        epochs=1,
        batch_size=16,
        num_virtual_tokens=10,
        lr=1e-2,
        projection=True,
        hidden=512,
        repeats=1,
        max_seq_len=128,
        parallel_archs=True,
    ),
    # < 3 minutes on 2 cores: the same preset on fewer examples.
    "quick": dict(
        preset="default",
        archs=("gpt2", "llama"),
        max_examples=256,
        epochs=1,
        batch_size=16,
        num_virtual_tokens=10,
        lr=1e-2,
        projection=True,
        hidden=512,
        repeats=1,
        max_seq_len=128,
        parallel_archs=True,
    ),
}
SEED = 0


def _log(msg: str) -> None:
    from bench.common import log

    log(msg)


# ----------------------------------------------------------------------------- setup (parent)


def build_bases(root: str, preset_name: str, archs, texts) -> dict[str, str]:
    """Random-init bases of the preset, one per architecture, sharing one BPE; saved to disk."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.ml.config import PRESETS
    from app.ml.pretrain import model_config
    from app.ml.tokenizer import train_bytelevel_bpe

    vocab = PRESETS[(archs[0], preset_name)].vocab_size
    tok = train_bytelevel_bpe(texts, vocab_size=vocab)
    out = {}
    for arch in archs:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(model_config(PRESETS[(arch, preset_name)], len(tok), tok.eos_token_id))
        path = os.path.join(root, arch)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[arch] = path
    return out


def fixed_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Plain shuffled fixed-size batches (a `DataLoader(shuffle=True)`), one reshuffle per epoch."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        out.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return out


# ----------------------------------------------------------------------------- subprocess


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _worker(role: str, spec: dict) -> dict:
    """One measurement in a fresh (spawned) interpreter: 'baseline', 'ours', 'peft', 'ours_same'."""
    warnings.filterwarnings("ignore")
    import peft  # noqa: F401  every role imports the same modules, so import memory cancels
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import app.ml.train as T
    from app.ml.base import load_base
    from app.ml.data import Example, collate, tokenize_example

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    examples = [Example(p, c) for p, c in spec["examples"]]
    cfg = PrefixTrainingConfig_from(spec)
    batches = spec["batches"]

    if role in ("ours", "ours_same"):
        base = load_base(spec["path"], device=device)
        tokenizer = base.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec["path"], local_files_only=True)
        tokenizer.padding_side = "right"  # the usual choice for training with a collator
        model = AutoModelForCausalLM.from_pretrained(spec["path"], local_files_only=True).to(device)
    max_len = min(spec["max_seq_len"], spec["max_positions"] - spec["num_virtual_tokens"])
    tokenized = [tokenize_example(x, tokenizer, max_len) for x in examples]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        loaded = int(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    if role == "baseline":
        return {"peak_bytes": _peak_bytes(device) if device.type != "cuda" else loaded}

    out: dict = {}
    if role == "ours":
        clock = _LoopClock()
        res = T.train_prefix(base, examples, None, cfg, callbacks=clock)
        m = res.metrics
        # train_prefix times its own loop (after tokenisation and init); its CPU time is taken from
        # the first progress callback's view of the loop start, see _LoopClock
        out.update(
            elapsed_s=m["elapsed_s"],
            cpu_s=time.process_time() - clock.c0,
            steps=res.steps,
            tokens=round(m["tokens_per_s"] * m["elapsed_s"]),
            final_loss=m["train_loss"],
        )
    elif role == "ours_same":
        out.update(_ours_on_batches(T, base, cfg, tokenized, batches, collate, device))
    elif role == "peft":
        out.update(_peft_loop(model, tokenizer, cfg, tokenized, batches, device))
    out["peak_bytes"] = _peak_bytes(device)
    if device.type == "cuda":
        out["loaded_bytes"] = loaded
    out["tokens_per_s"] = out["tokens"] / out["elapsed_s"]
    out["tokens_per_cpu_s"] = out["tokens"] / out["cpu_s"]
    return out


class _LoopClock:
    """TrainingCallbacks duck type: notes the process CPU time when train_prefix first asks
    `should_stop` (the top of its first step, right after its own wall clock starts)."""

    def __init__(self):
        self.c0 = None

    def should_stop(self) -> bool:
        if self.c0 is None:
            self.c0 = time.process_time()
        return False

    def on_progress(self, progress) -> None:
        pass

    def on_eval(self, step, metrics) -> None:
        pass

    def on_checkpoint(self, step, metrics) -> None:
        pass


def PrefixTrainingConfig_from(spec: dict):
    from app.ml.config import PrefixTrainingConfig

    return PrefixTrainingConfig(
        num_virtual_tokens=spec["num_virtual_tokens"],
        prefix_projection=spec["projection"],
        projection_hidden_size=spec["hidden"],
        n_epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        max_seq_len=spec["max_seq_len"],
        checkpoint_every=0,
        seed=SEED,
        early_stopping_patience=0,
    )


def _ours_on_batches(T, base, cfg, tokenized, batches, collate, device) -> dict:
    """`train_prefix`'s step (init, AdamW, schedule, `_batch_loss`, clip) on given index batches."""
    import inspect
    from contextlib import nullcontext

    import torch

    model, geometry = base.model, base.geometry
    pad_id = base.tokenizer.pad_token_id
    if device.type == "cuda":
        kv_dtype, amp_ctx = torch.bfloat16, lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        kv_dtype, amp_ctx = next(model.parameters()).dtype, nullcontext
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    total = len(batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            encoder = T._make_encoder(cfg, geometry, base, [], "random").to(device)
    encoder.train()
    opt = T.configure_optimizer(encoder, cfg)
    tokens, loss_val = 0, None
    with T._frozen_eval_mode(model, False):
        t0, c0 = time.perf_counter(), time.process_time()
        for step, idx in enumerate(batches):
            items = [tokenized[i] for i in idx]
            n_labels = sum(x.num_label_tokens for x in items)
            for g in opt.param_groups:
                g["lr"] = cfg.learning_rate_at(step, total)
            opt.zero_grad(set_to_none=True)
            loss, ntok = T._batch_loss(model, encoder, geometry, collate(items, pad_id), kv_dtype, amp_ctx, keep_logits)
            (loss / n_labels).backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.max_grad_norm)
            opt.step()
            loss_val = loss.item() / n_labels
            tokens += ntok
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"elapsed_s": elapsed, "cpu_s": cpu, "steps": total, "tokens": tokens, "final_loss": loss_val}


def _peft_loop(model, tokenizer, cfg, tokenized, batches, device) -> dict:
    """PEFT as a user trains it: get_peft_model, DataLoader + DataCollatorForSeq2Seq, model(**batch).loss."""
    from contextlib import nullcontext

    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_cosine_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    pcfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.projection_hidden_size,
    )
    model = get_peft_model(model, pcfg)
    model.train()
    features = [{"input_ids": x.input_ids, "attention_mask": [1] * len(x), "labels": x.labels} for x in tokenized]
    loader = DataLoader(
        features,
        batch_sampler=batches,
        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.peak_learning_rate, weight_decay=cfg.weight_decay)
    total = len(batches)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total), total)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    tokens, loss_val = 0, None
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss.item()
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"elapsed_s": elapsed, "cpu_s": cpu, "steps": total, "tokens": tokens, "final_loss": loss_val}


def _child(conn, role: str, spec: dict) -> None:
    try:
        conn.send(("ok", _worker(role, spec)))
    except BaseException as e:  # report, don't hang the parent
        import traceback

        conn.send(("error", f"{role}: {e!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_in_subprocess(role: str, spec: dict) -> dict:
    """`_worker(role, spec)` in a fresh spawned interpreter (its own ru_maxrss)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, role, spec))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


# ----------------------------------------------------------------------------- main


def _races(arch: str, spec: dict, repeats: int, runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    for rep in range(repeats):
        for role in runs:
            r = run_in_subprocess(role, spec)
            runs[role].append(r)
            _log(
                f"{arch} {role} #{rep}: {r['tokens_per_s']:.0f} tok/s wall, {r['tokens_per_cpu_s']:.0f} tok/cpu-s "
                f"({r['tokens']} tokens, {r['steps']} steps, {r['elapsed_s']:.1f} s, cpu {r['cpu_s']:.1f} s), "
                f"peak {r['peak_bytes'] / 2**20:.0f} MiB, loss {r['final_loss']:.3f}"
            )
    return runs


def race_arch(arch: str, path: str, cfg: dict, pairs, batches, device: str, threads: int, key: str) -> dict:
    """(ours, PEFT, ours on PEFT's batches) x repeats, one subprocess each, in turn, and the
    memory baseline subprocess (before them, or beside them with the CPU clock)."""
    import torch  # noqa: F401

    from app.ml.config import PRESETS

    preset = PRESETS[(arch, cfg["preset"])]
    spec = dict(
        cfg,
        path=path,
        examples=pairs,
        batches=batches,
        device=device,
        threads=threads,
        max_positions=preset.max_positions,
    )
    spec.pop("archs")
    runs: dict[str, list[dict]] = {"ours": [], "peft": [], "ours_same": []}
    if cfg["parallel_archs"]:  # CPU clock: the memory-only baseline may run beside the first race
        with ThreadPoolExecutor(1) as side:
            baseline_future = side.submit(run_in_subprocess, "baseline", spec)
            runs = _races(arch, spec, cfg["repeats"], runs)
            baseline = baseline_future.result()
    else:
        baseline = run_in_subprocess("baseline", spec)
        runs = _races(arch, spec, cfg["repeats"], runs)

    tps = {k: statistics.median(r[key] for r in v) for k, v in runs.items()}
    wall = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["tokens_per_cpu_s"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_bytes"] for r in v) for k, v in runs.items()}
    base_bytes = baseline["peak_bytes"]
    delta = {k: peak[k] - (runs[k][0].get("loaded_bytes", base_bytes)) for k in peak}
    res = {
        "tokens_per_s": {k: round(v, 1) for k, v in wall.items()},
        "tokens_per_cpu_s": {k: round(statistics.median(r["tokens_per_cpu_s"] for r in v), 1) for k, v in runs.items()},
        "wall_tokens_per_s_ratio": round(wall["ours"] / wall["peft"], 3),
        "wall_same_batches_ratio": round(wall["ours_same"] / wall["peft"], 3),
        "real_tokens": {k: runs[k][0]["tokens"] for k in runs},
        "steps": {k: runs[k][0]["steps"] for k in runs},
        "elapsed_s": {k: round(statistics.median(r["elapsed_s"] for r in v), 2) for k, v in runs.items()},
        "final_loss": {k: round(runs[k][0]["final_loss"], 4) for k in runs},
        "peak_mem_mib": {k: round(v / 2**20, 1) for k, v in peak.items()},
        "baseline_mem_mib": round(base_bytes / 2**20, 1),
        "peak_mem_delta_mib": {k: round(v / 2**20, 1) for k, v in delta.items()},
        "tokens_per_s_ratio": round(tps["ours"] / tps["peft"], 3),
        "same_batches_ratio": round(tps["ours_same"] / tps["peft"], 3),
        "cpu_tokens_per_s_ratio": round(cpu["ours"] / cpu["peft"], 3),
        "cpu_same_batches_ratio": round(cpu["ours_same"] / cpu["peft"], 3),
        "peak_mem_ratio": round(delta["ours"] / max(1, delta["peft"]), 3),
        "peak_mem_raw_ratio": round(peak["ours"] / peak["peft"], 3),
        "peak_mem_same_batches_ratio": round(delta["ours_same"] / max(1, delta["peft"]), 3),
    }
    _log(f"{arch}: " + json.dumps({k: res[k] for k in ("tokens_per_s_ratio", "same_batches_ratio", "peak_mem_ratio")}))
    return res


def main(argv=None) -> dict:
    from bench.common import emit, load_e2e, split_by_mr
    from bench.e2e_quality import to_examples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per subprocess (default: every core, or 1 with --clock cpu)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                    help="what the headline ratios divide by (default wall: what a user waits for)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--serial", action="store_true", help="one architecture after the other (default with --clock wall)"
    )
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.repeats:
        cfg["repeats"] = args.repeats
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    clock = args.clock
    threads = args.threads or (1 if clock == "cpu" else min(8, os.cpu_count() or 1))
    key = "tokens_per_cpu_s" if clock == "cpu" else "tokens_per_s"
    cfg["parallel_archs"] = cfg["parallel_archs"] and clock == "cpu" and not args.serial
    t_start = time.time()

    rows = split_by_mr(load_e2e())["train"]
    examples = to_examples(rows)
    if cfg["max_examples"] is not None:
        examples = random.Random(SEED).sample(examples, cfg["max_examples"])
    pairs = [(x.prompt, x.completion) for x in examples]
    batches = fixed_batches(len(pairs), cfg["batch_size"], cfg["epochs"], SEED)
    _log(f"{mode}: {len(pairs)} examples, {len(batches)} steps per trainer, device {device}, {threads} threads")

    with tempfile.TemporaryDirectory(prefix="train_vs_peft-") as root:
        paths = build_bases(root, cfg["preset"], cfg["archs"], [m for m, _ in rows] + [r for _, r in rows])
        archs = cfg["archs"]
        with ThreadPoolExecutor(len(archs) if cfg["parallel_archs"] else 1) as pool:
            futures = {a: pool.submit(race_arch, a, paths[a], cfg, pairs, batches, device, threads, key) for a in archs}
            per_arch = {a: f.result() for a, f in futures.items()}

    result = {
        "mode": mode,
        "device": device,
        "threads": threads,
        "clock": clock,
        "parallel_archs": cfg["parallel_archs"],
        "examples": len(pairs),
        "epochs": cfg["epochs"],
        "batch_size": cfg["batch_size"],
        "num_virtual_tokens": cfg["num_virtual_tokens"],
        "lr": cfg["lr"],
        "prefix_projection": cfg["projection"],
        "preset": cfg["preset"],
        "repeats": cfg["repeats"],
        "tokens_per_s_ratio": min(v["tokens_per_s_ratio"] for v in per_arch.values()),
        "same_batches_ratio": min(v["same_batches_ratio"] for v in per_arch.values()),
        "cpu_tokens_per_s_ratio": min(v["cpu_tokens_per_s_ratio"] for v in per_arch.values()),
        "cpu_same_batches_ratio": min(v["cpu_same_batches_ratio"] for v in per_arch.values()),
        "peak_mem_ratio": max(v["peak_mem_ratio"] for v in per_arch.values()),
        "per_arch": per_arch,
        "wall_s": round(time.time() - t_start, 1),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
