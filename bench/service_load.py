"""Service latency and throughput under closed-loop load, and the HTTP layer's overhead.

Starts `python -m service` on a loopback port (on the given weights, or on a freshly
initialized checkpoint when none are given: timings only, no accuracy), then for each budget
and concurrency runs that many clients, each sending one 32x32 PNG at a time (raw image/png
to /v1/models/<model>/predict) for --duration seconds. Also times a bare compact-executor call
on the same preprocessed image in this process: the HTTP overhead is the client-seen p50 at
concurrency 1 minus the bare call's p50.

    python bench/service_load.py --json service_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import free_port, make_weights, percentile, png_bytes, start_acs_serve, stop, wait_http

from models.checkpoint import load_checkpoint
from models.registry import compact


async def closed_loop(url: str, path: str, body: bytes, concurrency: int, seconds: float) -> dict:
    latencies, errors = [], {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                r = await client.post(path, content=body, headers={"content-type": "image/png"})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if not latencies:
        return {"ok": 0, "errors": errors}
    return {"ok": len(latencies), "errors": errors, "throughput": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 0.5) * 1e3, "p90_ms": percentile(latencies, 0.9) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


def bare_call_ms(weights: Path, model: str, budget: float, policy: str, image: bytes) -> float:
    """Median time of the compact executor on one preprocessed image, in this process."""
    from service.imaging import preprocess

    checkpoint = load_checkpoint(weights / model)
    executor = compact(checkpoint.model)
    x = preprocess([image], checkpoint.manifest, 10**8)
    times = []
    for i in range(60):
        start = time.perf_counter()
        executor(x, budget=budget, policy=policy)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def start_server(weights: Path, port: int, args) -> subprocess.Popen:
    proc = start_acs_serve(weights, port, args.threads, args.max_batch_size)
    wait_http(f"http://127.0.0.1:{port}/readyz", 120, proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="weights folder (default: a fresh random checkpoint)")
    parser.add_argument("--model", default="acs_densenet40_cheap")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--policy", default="topk")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights or tmp)
        if not args.weights:
            make_weights(weights, args.model, gate="cheap")
        image = png_bytes()
        bare = {b: bare_call_ms(weights, args.model, b, args.policy, image) for b in args.budgets}
        port = free_port()
        proc = start_server(weights, port, args)
        rows = []
        try:
            url, path = f"http://127.0.0.1:{port}", f"/v1/models/{args.model}/predict"
            for budget in args.budgets:
                query = f"{path}?budget={budget}&policy={args.policy}"
                asyncio.run(closed_loop(url, query, image, 1, 1.0))  # warm connections
                for c in args.concurrency:
                    result = asyncio.run(closed_loop(url, query, image, c, args.duration))
                    rows.append({"budget": budget, "concurrency": c, **result,
                                 "bare_ms": bare[budget]})
        finally:
            stop(proc, 60)
    print("| budget | concurrency | p50 ms | p90 ms | p99 ms | images/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['concurrency']} | {r.get('p50_ms', 0):.1f} | "
              f"{r.get('p90_ms', 0):.1f} | {r.get('p99_ms', 0):.1f} | {r.get('throughput', 0):.1f} "
              f"| {r['errors'] or 0} |")
    for b in args.budgets:
        c1 = next(r for r in rows if r["budget"] == b and r["concurrency"] == 1)
        print(f"budget {b}: bare model call p50 {bare[b]:.2f} ms, HTTP p50 at concurrency 1 "
              f"{c1['p50_ms']:.2f} ms, overhead {c1['p50_ms'] - bare[b]:.2f} ms")
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "model": args.model,
                "policy": args.policy, "weights": args.weights or "random", "cpus": os.cpu_count()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
