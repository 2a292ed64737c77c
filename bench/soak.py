"""Soak: the server at about 80% of its measured capacity for a long while, with mixed
budgets, policies, models, request formats and a few bad requests.

Starts `python -m service` on the shipped weights, measures its capacity (closed loop, the
same mix, --probe seconds), then sends requests on a Poisson schedule at --load of that rate
for --minutes, after --warmup minutes of the same load (it fills the kernel caches: oneDNN
keeps a compiled primitive per convolution shape, up to ONEDNN_PRIMITIVE_CACHE_CAPACITY, and
kept-channel counts make many shapes). Reports answers by status over both parts (and which were
expected: the bad requests' 4xx; 503 is shed load), client timeouts (a hang), p50/p99 of the
good requests and the server's resident memory per --window, and the memory growth from the
first measured window to the last (and over the warm-up).

    OMP_NUM_THREADS=1 python bench/soak.py --minutes 20 --json docs/performance/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import httpx
from common import ROOT, free_port, percentile, start_acs_serve, stop, wait_http
from PIL import Image

SAMPLES = ROOT / "samples" / "cifar10-jpeg-test"
BUDGETS = (None, 0.25, 0.5, 0.75, 1.0)
POLICIES = (None, "threshold", "topk", "cap")
BAD_SHARE = 0.03
BODY_LIMIT = 1024 * 1024  # the server's --max-body-bytes here: refusing 10 MiB bodies costs
OVERSIZE = b"x" * (BODY_LIMIT + 100_000)  # both Python processes more CPU than the images do
CONNECTIONS = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Mix:
    """Random requests: (kind, method args); kind 'good' or the bad request's expected status."""

    def __init__(self, models: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.models = models
        self.jpegs = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
        self.pngs = [self.png(j) for j in self.jpegs[:20]]
        self.encoded = [base64.b64encode(j).decode() for j in self.jpegs]

    @staticmethod
    def png(jpeg: bytes) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(buf, "PNG")
        return buf.getvalue()

    def request(self) -> tuple[str, dict]:
        r = self.rng
        if r.random() < BAD_SHARE:
            return r.choice([
                ("400", {"url": "/v1/predict", "content": b"not an image",
                         "headers": {"content-type": "image/jpeg"}}),
                ("422", {"url": "/v1/predict?budget=2", "content": r.choice(self.jpegs),
                         "headers": {"content-type": "image/jpeg"}}),
                ("404", {"url": "/v1/models/nope/predict", "content": r.choice(self.jpegs),
                         "headers": {"content-type": "image/jpeg"}}),
                ("413", {"url": "/v1/predict", "content": OVERSIZE,
                         "headers": {"content-type": "image/jpeg"}}),
            ])
        model, budget, policy = r.choice(self.models), r.choice(BUDGETS), r.choice(POLICIES)
        params = {k: v for k, v in (("budget", budget), ("policy", policy)) if v is not None}
        query = "&".join(f"{k}={v}" for k, v in params.items())
        path = f"/v1/models/{model}/predict" + (f"?{query}" if query else "")
        form = r.choice(("multipart", "raw", "json", "v2"))
        if form == "multipart":
            files = [("file", (f"{i}.png", r.choice(self.pngs), "image/png"))
                     for i in range(r.choice((1, 1, 1, 4)))]
            return "good", {"url": path, "files": files}
        if form == "raw":
            return "good", {"url": path, "content": r.choice(self.jpegs),
                            "headers": {"content-type": "image/jpeg"}}
        encoded = r.choice(self.encoded)
        if form == "json":
            return "good", {"url": f"/v1/models/{model}/predict", "json": {"image": encoded, **params}}
        return "good", {"url": f"/v2/models/{model}/infer", "json": {
            "parameters": params, "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                              "data": [encoded]}]}}


async def send(client: httpx.AsyncClient, kind: str, request: dict, log: list,
               due: float | None = None) -> None:
    """POST one request; log (due time, seconds to the answer, kind, status; a 503 with its
    reason: queue_full or deadline). A request sent after its due time (the client running
    behind) counts the lag in its time."""
    start = time.perf_counter() if due is None else due
    try:
        response = await client.post(**request)
        status = str(response.status_code)
        if status == "503":
            status += " " + response.json().get("reason", "unknown")
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.TransportError as e:
        status = f"transport:{type(e).__name__}"
    log.append((start, time.perf_counter() - start, kind, status))


async def capacity(url: str, mix: Mix, concurrency: int, seconds: float, timeout: float) -> float:
    """Good requests answered per second by a closed loop of `concurrency` clients."""
    log: list = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                kind, request = mix.request()
                if kind == "good":
                    await send(client, kind, request, log)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(1 for _, _, _, s in log if s == "200") / seconds


async def soak(url: str, pid: int, mix: Mix, rate: float, seconds: float, window: float,
               timeout: float) -> tuple[list, list]:
    """Poisson arrivals at `rate` for `seconds`; returns the request log, memory samples and
    how far behind its schedule the client fell (seconds, the largest lag)."""
    log, memory, tasks, lag = [], [], [], 0.0
    # a client pool, as real clients have: bursts wait for a connection (that wait counts).
    # At most CONNECTIONS requests are outstanding: a backlog inside httpx's pool costs the
    # client time per waiting request, and a client that falls behind then never catches up.
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    slots = asyncio.Semaphore(CONNECTIONS)

    async def limited(kind: str, request: dict, due: float) -> None:
        try:
            await send(client, kind, request, log, due)
        finally:
            slots.release()

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        next_arrival, next_sample = start, start
        while next_arrival < start + seconds:
            now = time.perf_counter()
            if now >= next_sample:
                memory.append((now - start, rss_mib(pid)))
                next_sample += window
            if next_arrival > now:
                await asyncio.sleep(min(next_arrival, next_sample) - now)
                continue
            kind, request = mix.request()
            await slots.acquire()
            tasks.append(asyncio.create_task(limited(kind, request, next_arrival)))
            lag = max(lag, time.perf_counter() - next_arrival)
            next_arrival += mix.rng.expovariate(rate)
            await asyncio.sleep(0)  # let the requests run even when behind schedule
        await asyncio.gather(*tasks)
        memory.append((time.perf_counter() - start, rss_mib(pid)))
    return [(t - start, d, k, s) for t, d, k, s in log], memory, lag


def windows(log: list, memory: list, window: float, seconds: float) -> list[dict]:
    """Per window of sending time: requests sent, p50/p99 of the good ones, peak RSS."""
    count = max(1, math.ceil(seconds / window))

    def slot(t: float) -> int:  # the last window takes the answers that came after the end
        return min(int(t // window), count - 1)

    rows = []
    for i in range(count):
        part = [e for e in log if slot(e[0]) == i]
        good = [d for _, d, k, s in part if k == "good" and s == "200"]
        rss = [m for t, m in memory if slot(t) == i]
        rows.append({"start_s": i * window, "requests": len(part),
                     "p50_ms": round(percentile(good, 0.5) * 1e3, 1) if good else None,
                     "p99_ms": round(percentile(good, 0.99) * 1e3, 1) if good else None,
                     "statuses": dict(Counter(s for *_, s in part)),
                     "rss_mib": round(max(rss), 1) if rss else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(ROOT / "weights"))
    p.add_argument("--models", nargs="+", default=["acs_ranked_fastnet", "fastnet"])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--warmup", type=float, default=3, help="minutes of the load before measuring")
    p.add_argument("--load", type=float, default=0.8, help="share of the measured capacity")
    p.add_argument("--probe", type=float, default=30, help="seconds of the capacity measurement")
    p.add_argument("--concurrency", type=int, default=16, help="clients of the capacity probe")
    p.add_argument("--window", type=float, default=60, help="seconds per reported window")
    p.add_argument("--timeout", type=float, default=30, help="client timeout: a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_acs_serve(Path(args.weights), port, max_queue_size=None,
                           extra=("--max-body-bytes", str(BODY_LIMIT)))
    try:
        wait_http(url + "/readyz", 120, proc)
        mix = Mix(args.models, args.seed)
        measured = asyncio.run(capacity(url, mix, args.concurrency, args.probe, args.timeout))
        rate = args.load * measured
        print(f"capacity {measured:.1f} good requests/s (closed loop, {args.concurrency} clients); "
              f"soaking at {rate:.1f}/s for {args.warmup:g} + {args.minutes:g} min", flush=True)
        warm_log, warm_memory, warm_lag = asyncio.run(soak(url, proc.pid, mix, rate, args.warmup * 60,
                                                           args.window, args.timeout))
        log, memory, lag = asyncio.run(soak(url, proc.pid, mix, rate, args.minutes * 60,
                                            args.window, args.timeout))
    finally:
        stop(proc)
    rows = windows(log, memory, args.window, args.minutes * 60)
    for row in rows:
        print(f"{row['start_s']:6.0f}s  {row['requests']:6d} requests  p50 {row['p50_ms']} ms  "
              f"p99 {row['p99_ms']} ms  rss {row['rss_mib']} MiB  {row['statuses']}")
    answers = warm_log + log  # every answer counts, the warm-up's too
    statuses = Counter((k, s) for *_, k, s in answers)
    unexpected = {f"{k}->{s}": n for (k, s), n in statuses.items()
                  if not (s == "200" and k == "good") and s != k}
    first, last = rows[0]["rss_mib"], rows[-1]["rss_mib"]
    summary = {
        "capacity_per_s": round(measured, 2), "rate_per_s": round(rate, 2), "minutes": args.minutes,
        "warmup_minutes": args.warmup, "warmup_requests": len(warm_log),
        "requests": len(log), "by_status": dict(Counter(s for *_, s in answers)),
        "unexpected": unexpected,
        "server_errors": sum(n for (_, s), n in statuses.items() if s.startswith("5")),
        "shed": sum(n for (_, s), n in statuses.items() if s.startswith("503")),  # Retry-After
        "timeouts": statuses.get(("good", "timeout"), 0),
        "client_lag_max_s": round(max(lag, warm_lag), 3),  # > 0.1: the client set the pace
        "rss_warmup_start_mib": round(warm_memory[0][1], 1) if warm_memory else None,
        "rss_first_window_mib": first, "rss_last_window_mib": last,
        "rss_growth": round(last / first - 1, 4), "windows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "windows"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
