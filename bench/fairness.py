"""Fair serving, end to end: does a tenant flooding the server starve another?

`python -m bench.fairness [--quick] [--base DIR]` starts the service (a real uvicorn process,
embedded mode, a fresh DATA_DIR, as `bench.serving` does), creates tenants A and B with one
imported prefix adapter each, and then:
1. idle: B sends its requests one after another on an otherwise idle server;
2. loaded: A keeps `--in-flight` (200) requests in flight (each one answered is replaced at
   once); once A is in steady state (A's requests answered twice over, or 30 s / 60 s), B
   sends the same requests one after another again.
It prints `b_latency_ratio` = B's median latency under load / B's median latency idle (target
<= 3) as the last stdout line (JSON), with the percentiles and A's throughput.

B's requests are sent from a process of its own (`python -m bench.fairness --b-client ...`), as a
second tenant's client would be: sharing A's event loop, each of B's requests would also wait
behind the client-side work of A's 200 (httpx parsing and sending on one busy loop), which adds
latency the server cannot see.

A and B send the same request shape (the same `max_tokens`, greedy). A's rate quotas are lifted
through the admin API (`requests_per_minute` and `tokens_per_minute` = 0, unlimited): this measures
the batch scheduler, not the quota. B keeps the defaults. A request answered 429 (A's queue share
full) is counted and retried by A after its `Retry-After`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.config import Settings
from bench.common import REPO, emit, log
from bench.serving import PROMPTS, Service, _peft_zip, pick_base


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _b_requests(url: str, key: str, model: str, n: int, max_tokens: int,
                      depths: list[float] | None = None) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
        for i in range(n):
            if depths is not None:
                depths.append(await _queue_depth(c))
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)] + f" b{i}", "max_tokens": max_tokens,
                    "temperature": 0}
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json=body)
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


class BClient:
    """B's own process (`python -m bench.fairness --b-client URL KEY MODEL`), started once and kept
    waiting, so that starting it costs nothing during a measurement: each `run(n, max_tokens)`
    sends one line and reads back {"latencies", "depths"}."""

    def __init__(self, url: str, key: str, model: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fairness", "--b-client", json.dumps([url, key, model])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, n: int, max_tokens: int) -> tuple[list[float], list]:
        self.proc.stdin.write(json.dumps([n, max_tokens]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"B's client exited with {self.proc.wait()}")
        res = json.loads(line)
        return res["latencies"], res["depths"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _b_client(spec: str) -> int:
    """The loop of B's process: one line [n, max_tokens] in, one JSON line out."""
    url, key, model = json.loads(spec)
    print("ready", flush=True)
    for line in sys.stdin:
        n, max_tokens = json.loads(line)
        depths: list[float] = []
        latencies = asyncio.run(_b_requests(url, key, model, n, max_tokens, depths))
        print(json.dumps({"latencies": latencies, "depths": depths}), flush=True)
    return 0


async def _loaded(url: str, key_a: str, b_client: BClient, model_a: str, in_flight: int, n_b: int,
                  max_tokens: int, warm_max_s: float) -> dict:
    stop = asyncio.Event()
    stats = {"a_done": 0, "a_429": 0, "a_errors": 0, "a_error_kinds": {}}

    def error(kind: str) -> None:
        stats["a_errors"] += 1
        stats["a_error_kinds"][kind] = stats["a_error_kinds"].get(kind, 0) + 1
    limits = httpx.Limits(max_connections=in_flight + 8, max_keepalive_connections=in_flight + 8)

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key_a}"}, timeout=600,
                                 limits=limits) as ca:
        async def a_worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                body = {"model": model_a, "prompt": PROMPTS[(w + i) % len(PROMPTS)] + f" a{w}.{i}",
                        "max_tokens": max_tokens, "temperature": 0}
                i += 1
                try:
                    r = await ca.post("/v1/completions", json=body)
                except httpx.HTTPError as e:
                    error(type(e).__name__)
                    continue
                if r.status_code == 200:
                    stats["a_done"] += 1
                elif r.status_code == 429:
                    stats["a_429"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                else:
                    error(f"{r.status_code}: {r.text[:120]}")

        workers = [asyncio.create_task(a_worker(w)) for w in range(in_flight)]
        # steady state: A's requests answered twice over (so they are cycling and its backlog sits
        # wherever the server keeps it; the first round all starts at once and ends in a wave that
        # the second round evens out), or warm_max_s, whichever comes first
        t_warm = time.perf_counter()
        while stats["a_done"] < 2 * in_flight and time.perf_counter() - t_warm < warm_max_s:
            await asyncio.sleep(0.25)
        warm_s = time.perf_counter() - t_warm
        warm_rate = stats["a_done"] / warm_s
        t0 = time.perf_counter()
        done0 = stats["a_done"]
        b, depths = await asyncio.to_thread(b_client.run, n_b, max_tokens)
        elapsed = time.perf_counter() - t0
        a_rate = (stats["a_done"] - done0) / elapsed
        stop.set()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    depths = [d for d in depths if d is not None]
    return {"b": b, "warm_s": round(warm_s, 1), "a_requests_per_s": round(a_rate, 2),
            "a_warm_requests_per_s": round(warm_rate, 2),
            "scheduler_queue_depth_mean": round(statistics.mean(depths), 1) if depths else None, **stats}


async def _queue_depth(client: httpx.AsyncClient) -> float | None:
    """Rows waiting in the engine's fair scheduler (`prefixd_queue_depth`)."""
    try:
        for line in (await client.get("/metrics")).text.splitlines():
            if line.startswith("prefixd_queue_depth "):
                return float(line.split()[1])
    except httpx.HTTPError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer of B's requests and tokens (CI)")
    ap.add_argument("--base", type=Path, default=None, help="a local HF causal-LM directory to serve")
    ap.add_argument("--in-flight", type=int, default=200, help="A's requests kept in flight")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--b-requests", type=int, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "1")))
    ap.add_argument("--b-client", default=None, help=argparse.SUPPRESS)  # internal: B's own process
    args = ap.parse_args(argv)
    if args.b_client:
        return _b_client(args.b_client)
    max_tokens = args.max_tokens or (8 if args.quick else 16)
    n_b = args.b_requests or (6 if args.quick else 15)

    with tempfile.TemporaryDirectory(prefix="prefixd-fairness-") as tmp:
        tmp_path = Path(tmp)
        base_dir, base_kind = pick_base(args.base, tmp_path)
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        log(f"starting the API on base {base_dir}")
        svc = Service(base_dir.resolve(), data_dir, args.threads)
        try:
            svc.wait_ready()
            admin = {"Authorization": f"Bearer {svc.admin}"}
            keys, models = {}, {}
            for i, name in enumerate(("A", "B")):
                r = httpx.post(f"{svc.url}/v1/admin/tenants", json={"name": f"fairness-{name}"}, headers=admin,
                               timeout=30)
                r.raise_for_status()
                keys[name], tid = r.json()["api_key"], r.json()["id"]
                if name == "A":  # measure the scheduler, not A's rate quota
                    httpx.patch(f"{svc.url}/v1/admin/tenants/{tid}", headers=admin, timeout=30, json={
                        "quotas": {"requests_per_minute": 0, "tokens_per_minute": 0}}).raise_for_status()
                r = httpx.post(f"{svc.url}/v1/models/import", headers={"Authorization": f"Bearer {keys[name]}"},
                               timeout=60, data={"suffix": f"fair{name.lower()}"},
                               files={"file": ("a.zip", _peft_zip(base_dir, 10 + 10 * i, i), "application/zip")})
                r.raise_for_status()
                models[name] = r.json()["id"]
            log("warm-up")
            b_client = BClient(svc.url, keys["B"], models["B"])
            b_client.run(2, max_tokens)
            log(f"idle: B sends {n_b} requests one after another")
            idle, _ = b_client.run(n_b, max_tokens)
            log(f"  median {statistics.median(idle):.3f} s; loaded: A keeps {args.in_flight} in flight")
            loaded = asyncio.run(_loaded(svc.url, keys["A"], b_client, models["A"], args.in_flight,
                                         n_b, max_tokens, 30.0 if args.quick else 60.0))
            b_client.close()
            log(f"  median {statistics.median(loaded['b']):.3f} s")
        finally:
            svc.stop()

    b_idle, b_loaded = statistics.median(idle), statistics.median(loaded["b"])
    emit({
        "benchmark": "fairness",
        "quick": args.quick,
        "base": base_kind,
        "torch_threads": args.threads,
        "max_tokens": max_tokens,
        "a_in_flight": args.in_flight,
        "a_requests_per_s": loaded["a_requests_per_s"],  # while B's requests ran
        "a_warm_requests_per_s": loaded["a_warm_requests_per_s"],  # before, during the warm-up
        "a_done": loaded["a_done"],
        "a_429": loaded["a_429"],
        "a_errors": loaded["a_errors"],
        "a_error_kinds": loaded["a_error_kinds"],
        "max_batch_size": Settings().max_batch_size,  # the service's, from the same environment
        "warm_s": loaded["warm_s"],
        "scheduler_queue_depth_mean": loaded["scheduler_queue_depth_mean"],
        "b_requests": n_b,
        "b_idle_median_s": round(b_idle, 3),
        "b_idle_p90_s": round(_pct(idle, 0.9), 3),
        "b_loaded_median_s": round(b_loaded, 3),
        "b_loaded_p90_s": round(_pct(loaded["b"], 0.9), 3),
        "target": 3.0,
        "b_latency_ratio": round(b_loaded / b_idle, 2),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
