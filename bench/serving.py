"""Mixed-prefix serving benchmark, end to end over HTTP.

`python -m bench.serving [--quick] [--base DIR]` starts the service (a real uvicorn process,
embedded mode, a fresh DATA_DIR), creates a tenant, imports 2 random prefix adapters through
`POST /v1/models/import`, then sends 24 completion requests over the 2 adapters:
1. all 24 at once (the engine batches them, mixing both adapters in one forward pass);
2. the same 24, one after another.
It prints `concurrent_vs_sequential` = sequential wall time / concurrent wall time (target >= 3 on
2 cores), and checks that each request's greedy text is the same both ways. The last stdout line
is JSON. The service runs with its own defaults (BATCH_WINDOW_MS, MAX_BATCH_SIZE, one torch
thread) unless the environment sets them.

The base: `--base DIR` (any local HF causal LM), else `DATA_DIR`'s default base if it exists,
else an untrained model with the default base's shape (`PRESETS[("llama", "default")]`), which
has exactly the default base's compute cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import REPO, emit, log

N_REQUESTS = 24
PROMPTS = [
    "name: Aromi | food: Chinese | area: city centre ->",
    "The quick brown fox",
    "name: The Eagle | eatType: coffee shop | priceRange: cheap ->",
    "label the review: the pizza was great ->",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _untrained_default_shape(out: Path) -> Path:
    from app.ml.config import BaseTrainingConfig
    from app.ml.pretrain import create_base

    texts = [p * 4 for p in PROMPTS] * 50
    create_base(str(out), "llama", "default", texts, seed=0, config=BaseTrainingConfig(steps=0))
    return out


def pick_base(given: Path | None, tmp_path: Path) -> tuple[Path, str]:
    """(base dir, kind): the given one, else DATA_DIR's built default, else an untrained base of
    the default base's shape (speed does not depend on the weights)."""
    if given is not None:
        return given, "given"
    default = Path(os.environ.get("DATA_DIR", REPO / "var")) / "models" / "default"
    if (default / "config.json").is_file():
        return default, "default"
    log("building an untrained base of the default base's shape")
    return _untrained_default_shape(tmp_path / "base"), "untrained-default-shape"


def _peft_zip(base_dir: Path, P: int, seed: int) -> bytes:
    import torch
    from transformers import AutoConfig

    from app.ml.adapter import Adapter, export_peft_zip
    from app.ml.kvcache import ModelGeometry
    from app.ml.prefix import PrefixConfig

    g = ModelGeometry.of(AutoConfig.from_pretrained(str(base_dir), local_files_only=True))
    cfg = PrefixConfig(g.num_layers, g.num_kv_heads, g.head_dim, num_virtual_tokens=P)
    table = torch.randn(P, cfg.table_width, generator=torch.Generator().manual_seed(seed)) * g.head_dim**-0.5
    return export_peft_zip(Adapter.from_table(table, cfg, "unused-import-sets-it"))


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300, hint: str = "") -> None:
    """Until `url`/readyz answers 200; fails at once if `proc` (the service) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}; {hint}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the service did not become ready")


class Service:
    def __init__(self, base_dir: Path, data_dir: Path, threads: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = "sk-admin-bench"
        # MAX_BATCH_SIZE and the other serving settings: the service's defaults unless the
        # environment sets them (it is passed through)
        env = dict(os.environ, DATA_DIR=str(data_dir), BASE_MODEL=str(base_dir), ADMIN_API_KEY=self.admin,
                   OMP_NUM_THREADS=str(threads), TORCH_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.log = open(data_dir / "api.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.url, self.proc, timeout, f"see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _batch_metrics(url: str) -> dict:
    """Decode steps run so far and their rows (from /metrics: `prefixd_batch_size` is observed once
    per decode step of the continuous batch)."""
    count = total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixd_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("prefixd_batch_size_sum"):
            total = float(line.split()[-1])
    return {"batches": int(count), "rows": total}


async def _one(client: httpx.AsyncClient, body: dict) -> dict:
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return r.json()


async def _run(url: str, key: str, bodies: list[dict], concurrent: bool) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        if concurrent:
            out = await asyncio.gather(*(_one(client, b) for b in bodies))
        else:
            out = [await _one(client, b) for b in bodies]
        return time.perf_counter() - t0, list(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens per request (CI)")
    ap.add_argument("--base", type=Path, default=None, help="a local HF causal-LM directory to serve")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "1")),
                    help="torch threads of the API process (the service default is 1)")
    args = ap.parse_args(argv)
    max_tokens = args.max_tokens or (16 if args.quick else 48)

    with tempfile.TemporaryDirectory(prefix="prefixd-bench-") as tmp:
        tmp_path = Path(tmp)
        base_dir, base_kind = pick_base(args.base, tmp_path)
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        log(f"starting the API on base {base_dir}")
        svc = Service(base_dir.resolve(), data_dir, args.threads)
        try:
            svc.wait_ready()
            admin = {"Authorization": f"Bearer {svc.admin}"}
            tenant = httpx.post(f"{svc.url}/v1/admin/tenants", json={"name": "bench"}, headers=admin, timeout=30)
            tenant.raise_for_status()
            key = tenant.json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            adapters = []
            for i, P in enumerate((10, 20)):
                r = httpx.post(f"{svc.url}/v1/models/import", headers=auth, timeout=60, data={"suffix": f"bench{i}"},
                               files={"file": ("adapter.zip", _peft_zip(base_dir, P, i), "application/zip")})
                r.raise_for_status()
                adapters.append(r.json()["id"])
            bodies = [{"model": adapters[i % 2], "prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}",
                       "max_tokens": max_tokens, "temperature": 0} for i in range(N_REQUESTS)]
            log("warm-up")
            asyncio.run(_run(svc.url, key, bodies[:2], concurrent=True))
            log(f"{N_REQUESTS} concurrent requests over {len(adapters)} adapters")
            before = _batch_metrics(svc.url)
            t_conc, out_conc = asyncio.run(_run(svc.url, key, bodies, concurrent=True))
            log(f"  {t_conc:.2f} s; the same {N_REQUESTS}, one after another")
            after = _batch_metrics(svc.url)
            n_batches = after["batches"] - before["batches"]
            metrics_conc = {"batches": n_batches,
                            "mean": round((after["rows"] - before["rows"]) / n_batches, 2) if n_batches else None}
            t_seq, out_seq = asyncio.run(_run(svc.url, key, bodies, concurrent=False))
            log(f"  {t_seq:.2f} s")
        finally:
            svc.stop()

    tokens_conc = sum(o["usage"]["completion_tokens"] for o in out_conc)
    tokens_seq = sum(o["usage"]["completion_tokens"] for o in out_seq)
    same = [a["choices"][0]["text"] == b["choices"][0]["text"] for a, b in zip(out_conc, out_seq, strict=False)]
    emit({
        "benchmark": "serving",
        "quick": args.quick,
        "base": base_kind,
        "requests": N_REQUESTS,
        "adapters": 2,
        "max_tokens": max_tokens,
        "torch_threads": args.threads,
        "concurrent_s": round(t_conc, 3),
        "sequential_s": round(t_seq, 3),
        "concurrent_tokens_per_s": round(tokens_conc / t_conc, 1),
        "sequential_tokens_per_s": round(tokens_seq / t_seq, 1),
        "same_text_batched_and_alone": sum(same),
        "decode_steps_during_concurrent": metrics_conc["batches"],
        "mean_rows_per_decode_step": metrics_conc["mean"],
        "concurrent_vs_sequential": round(t_seq / t_conc, 2),
        "target": 3.0,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
