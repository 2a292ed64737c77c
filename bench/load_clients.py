"""Load generators for bench/service_load.py, each returning rows of one form (ok, errors,
throughput, p50/p90/p99 ms of the successful requests):

- closed_loop: `concurrency` in-process httpx clients, one request in flight each;
- hey_closed_loop: the same through `hey` (its per-request CSV);
- wrk_closed_loop: the same through `wrk`, each connection posting the next of several bodies
  (real photos: an input-adaptive model costs what its inputs make it cost);
- perf_analyzer_closed_loop: Triton's perf_analyzer on the KServe v2 endpoint (its CSV);
- open_loop: requests on a fixed schedule (Poisson or uniform arrivals) whatever the server
  answers, each with a client timeout, sorted into successes, rejections (429/503), timeouts
  (client timeout or 504) and other errors.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from common import percentile

REJECTED = {"429", "503"}
TIMED_OUT = {"timeout", "504"}
PA_WINDOWS = 3  # perf_analyzer: measurement windows per concurrency (its stability check needs 3)
PA_MAX_TRIALS = 5
PA_STABILITY_PERCENT = 100  # accept windows whose max/min ratio is within 2x (a shared machine)


def latency_row(latencies: list[float], seconds: float, errors: Counter | dict) -> dict:
    """The common row: successes, errors by status, throughput and latency percentiles (ms)."""
    row = {"ok": len(latencies), "errors": dict(errors), "throughput": len(latencies) / seconds}
    for q in (50, 90, 99):
        row[f"p{q}_ms"] = percentile(latencies, q / 100) * 1e3 if latencies else None
    return row


async def post(client: httpx.AsyncClient, path: str, body: bytes,
               timeout: float | None = None) -> tuple[str, float]:
    """POST one PNG: the outcome ('200', '503', 'timeout', 'ConnectError', ...) and seconds.
    `timeout` bounds the whole request (httpx's own timeouts bound each phase)."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            r = await client.post(path, content=body, headers={"content-type": "image/png"})
        code = str(r.status_code)
    except (httpx.TimeoutException, TimeoutError):
        code = "timeout"
    except httpx.HTTPError as e:
        code = type(e).__name__
    return code, time.perf_counter() - start


async def closed_loop(url: str, path: str, body: bytes, concurrency: int, seconds: float,
                      timeout: float = 60, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """`concurrency` clients, each sending the next request when its last one is answered."""
    latencies, errors = [], Counter()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits,
                                 transport=transport) as client:
        async def worker():
            while time.perf_counter() < deadline:
                code, took = await post(client, path, body)
                if code == "200":
                    latencies.append(took)
                else:
                    errors[code] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latency_row(latencies, seconds, errors)


def arrival_times(rate: float, seconds: float, poisson: bool = True, seed: int = 0) -> list[float]:
    """Send times in [0, seconds): a Poisson process of `rate` per second, or evenly spaced."""
    if not poisson:
        return [i / rate for i in range(int(rate * seconds))]
    rng, times, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        times.append(t)
    return times


def open_loop_row(rate: float, outcomes: list[tuple[str, float]], lags: list[float],
                  elapsed: float) -> dict:
    """Summary of one open-loop run: throughput, latencies, and the fraction of each failure."""
    sent = len(outcomes)
    ok = [took for code, took in outcomes if code == "200"]
    rejected = [took for code, took in outcomes if code in REJECTED]
    timed_out = sum(code in TIMED_OUT for code, _ in outcomes)
    other = Counter(code for code, _ in outcomes if code not in REJECTED | TIMED_OUT | {"200"})
    row = latency_row(ok, elapsed, other)
    return {"offered_rate": rate, "sent": sent, **row,
            "rejected_fraction": len(rejected) / sent if sent else 0.0,
            "timeout_fraction": timed_out / sent if sent else 0.0,
            "reject_p50_ms": percentile(rejected, 0.5) * 1e3 if rejected else None,
            "send_lag_p99_ms": percentile(lags, 0.99) * 1e3 if lags else None}


async def open_loop(url: str, path: str, body: bytes, rate: float, seconds: float, timeout: float,
                    poisson: bool = True, seed: int = 0,
                    transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Send requests at `rate` per second for `seconds`, never waiting for answers, then wait
    for every answer (each at most `timeout` seconds)."""
    schedule = arrival_times(rate, seconds, poisson, seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits,
                                 transport=transport) as client:
        tasks, lags = [], []
        start = time.perf_counter()
        for t in schedule:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, -delay))
            tasks.append(asyncio.create_task(post(client, path, body, timeout)))
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return open_loop_row(rate, outcomes, lags, elapsed)


def parse_hey_csv(text: str, seconds: float) -> dict:
    """Rows from `hey -o csv` (response-time in seconds, status-code per request). hey writes
    no row for a request that got no response (connection error, its own timeout)."""
    latencies, errors = [], Counter()
    for rec in csv.DictReader(io.StringIO(text)):
        if rec["status-code"] == "200":
            latencies.append(float(rec["response-time"]))
        else:
            errors[rec["status-code"]] += 1
    return latency_row(latencies, seconds, errors)


def hey_closed_loop(url: str, body_file: Path, concurrency: int, seconds: float,
                    timeout: float = 60, content_type: str = "image/png") -> dict:
    """`hey -z` with `concurrency` workers POSTing body_file (a PNG by default) to url."""
    cmd = [tool("hey"), "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST",
           "-T", content_type, "-D", str(body_file), "-t", f"{timeout:g}", "-o", "csv", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=seconds + timeout + 30).stdout
    return parse_hey_csv(out, seconds)


WRK_SCRIPT = """
local bodies, next_body, content_type = {}, 0, os.getenv("WRK_CONTENT_TYPE")
function init(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
  next_body = math.random(#bodies) - 1
end
function request()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = content_type}, bodies[next_body])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %.1f %.1f %.1f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, e.timeout, 0,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_closed_loop(url: str, bodies: list[Path], concurrency: int, seconds: float,
                    content_type: str, timeout: float = 60) -> dict:
    """`wrk` with `concurrency` connections (one request in flight each) POSTing `bodies` in
    turn; latency percentiles over every request (wrk does not split out errors)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bodies.lua"
        script.write_text(WRK_SCRIPT)
        cmd = [tool("wrk"), "-t", "1", "-c", str(concurrency), "-d", f"{seconds:g}s",
               "--timeout", f"{timeout:g}s", "-s", str(script), url, "--", *map(str, bodies)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + timeout + 30,
                             env={"WRK_CONTENT_TYPE": content_type, "PATH": "/usr/bin:/bin"}).stdout
    fields = next(line for line in out.splitlines() if line.startswith("WRK ")).split()[1:]
    requests, micros, transport, status, timeouts = map(int, fields[:5])
    p50, p90, p99 = (float(v) / 1e3 for v in fields[6:9])
    errors = {k: v for k, v in {"non-2xx": status, "transport": transport, "timeout": timeouts}.items() if v}
    return {"ok": requests - status - transport, "errors": errors, "throughput": requests / (micros / 1e6),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}


def parse_perf_analyzer_csv(text: str) -> list[dict]:
    """Rows from `perf_analyzer -f` (latencies in microseconds), one per concurrency."""
    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        rows.append({"concurrency": int(rec["Concurrency"]),
                     "throughput": float(rec["Inferences/Second"]),
                     **{f"p{q}_ms": float(rec[f"p{q} latency"]) / 1e3 for q in (50, 90, 99)}})
    return rows


def perf_analyzer_closed_loop(host_port: str, model: str, input_data: Path, concurrency: int,
                              seconds: float) -> dict:
    """perf_analyzer over HTTP at one concurrency: PA_WINDOWS windows of seconds / PA_WINDOWS."""
    window_ms = max(100, int(seconds * 1000 / PA_WINDOWS))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "perf_analyzer.csv"
        cmd = [tool("perf_analyzer"), "-m", model, "-u", host_port, "-i", "http",
               "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(input_data),
               "--measurement-interval", str(window_ms), "--max-trials", str(PA_MAX_TRIALS),
               "--stability-percentage", str(PA_STABILITY_PERCENT), "-f", str(report)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=seconds * PA_MAX_TRIALS / PA_WINDOWS + 60)
        if proc.returncode != 0 or not report.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"perf_analyzer failed (exit {proc.returncode}):\n{tail}")
        (row,) = parse_perf_analyzer_csv(report.read_text())
    return {**row, "ok": None, "errors": {}}


def tool(name: str) -> str:
    """The path of an external load generator, or a clear error when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH (hey, wrk: apt-get install hey wrk; "
                                "perf_analyzer: see bench/service_load.py)")
    return path
