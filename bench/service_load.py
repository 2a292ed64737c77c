"""Service latency and throughput under closed- and open-loop load, and the HTTP layer's overhead.

Starts `python -m service` on a loopback port on --weights (the shipped ones by default) and
loads --model (the shipped default, acs_ranked_fastnet, under --policy threshold), then:

- closed loop: for each budget and concurrency, that many clients each send one 32x32 image
  at a time for --duration seconds. --client httpx (in-process) and hey POST the PNG to
  /v1/models/<model>/predict?budget=&policy=; --client perf_analyzer sends the preprocessed
  FP32 tensor to /v2/models/<model>/infer. perf_analyzer's HTTP client cannot send request
  parameters, so each budget is served as its own model whose default budget it is.
- open loop (--rates): a second server with a small queue (--open-queue-size) gets requests
  on a fixed schedule (Poisson arrivals by default) whatever it answers, each with a client
  timeout (--timeout, also sent as the request's deadline): past saturation it should refuse
  the excess at once (503) rather than let requests time out.
- the HTTP overhead: a bare call of the model's executor (as the server runs it) on the same
  preprocessed image in this process, against the client-seen p50 at concurrency 1.

    OMP_NUM_THREADS=1 python bench/service_load.py --json service_load.json --plot service_load.png
    OMP_NUM_THREADS=1 python bench/service_load.py --client hey --rates
    OMP_NUM_THREADS=1 python bench/service_load.py --client perf_analyzer --rates

hey: `apt-get install hey`. perf_analyzer: the PyPI wheels (perf-analyzer >= 2.58) need
glibc 2.38; on older systems take bin/perf_analyzer from the tritonclient 2.49.0 wheel, with
libb64 (apt libb64-0d) and libcudart.so.12 (wheel nvidia-cuda-runtime-cu12) on its library path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import torch
from common import fmt, free_port, markdown_table, median_ms, png_bytes, start_acs_serve, stop, wait_http
from load_clients import closed_loop, hey_closed_loop, open_loop, perf_analyzer_closed_loop

from models.core.budget import POLICIES
from models.core.checkpoint import load_checkpoint
from models.engines.precision import serving_dtype
from models.engines.variants import VariantExecutor, executor_for
from service.config import from_env
from service.imaging import preprocess

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MAX_PIXELS = 10**8
CLOSED_QUEUE_SIZE = 1024  # closed loop: never full, clients wait for their answers


def bare_call_ms(checkpoint, budget: float, policy: str, image: bytes) -> float:
    """Median time of the model's executor (engine and precision as served) on one
    preprocessed image, in this process."""
    dtype = serving_dtype("auto", torch.device("cpu"), checkpoint.manifest)
    executor = executor_for(checkpoint.model, "cpu", dtype)
    x = preprocess([image], checkpoint.manifest, MAX_PIXELS)
    if not isinstance(executor, VariantExecutor):
        x = x.to(dtype)
    return median_ms(lambda: executor(x, budget=budget, policy=policy))


def budget_models(weights: Path, model: str, budgets: list[float], policy: str,
                  out: Path) -> dict[float, str]:
    """One model per budget under out/ (same weights, that budget as its default), by budget."""
    source = weights / model
    manifest = json.loads((source / "manifest.json").read_text())
    names = {}
    for budget in budgets:
        name = f"{model}_b{round(budget * 100):03d}"
        (out / name).mkdir(parents=True)
        (out / name / manifest["weights"]["file"]).symlink_to(source / manifest["weights"]["file"])
        variant = {**manifest, "name": name, "default": {"budget": budget, "policy": policy}}
        (out / name / "manifest.json").write_text(json.dumps(variant))
        names[budget] = name
    return names


def perf_analyzer_input(checkpoint, image: bytes, path: Path) -> Path:
    """perf_analyzer --input-data JSON: the image as the model's preprocessed FP32 INPUT."""
    x = preprocess([image], checkpoint.manifest, MAX_PIXELS)[0]
    path.write_text(json.dumps({"data": [{"INPUT": {"content": x.flatten().tolist(),
                                                     "shape": list(x.shape)}}]}))
    return path


def serve(weights: Path, args, queue_size: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = start_acs_serve(weights, port, args.threads, args.max_batch_size, queue_size)
    wait_http(f"http://127.0.0.1:{port}/readyz", 120, proc)
    return proc, port


def v1_path(model: str, budget: float, policy: str) -> str:
    return f"/v1/models/{model}/predict?budget={budget}&policy={policy}"


def closed_loop_rows(args, tmp: Path, weights: Path, checkpoint, image: bytes) -> list[dict]:
    """Every (budget, concurrency) of the closed loop, through args.client."""
    names = {b: args.model for b in args.budgets}
    if args.client == "perf_analyzer":
        names = budget_models(weights, args.model, args.budgets, args.policy, tmp / "per_budget")
        weights = tmp / "per_budget"
        input_data = perf_analyzer_input(checkpoint, image, tmp / "input.json")
    if args.client == "hey":
        body_file = tmp / "image.png"
        body_file.write_bytes(image)
    proc, port = serve(weights, args, CLOSED_QUEUE_SIZE)
    url, rows = f"http://127.0.0.1:{port}", []
    try:
        for budget in args.budgets:
            path = v1_path(names[budget], budget, args.policy)
            asyncio.run(closed_loop(url, path, image, 1, 1.0))  # warm connections and this budget
            for c in args.concurrency:
                if args.client == "hey":
                    result = hey_closed_loop(url + path, body_file, c, args.duration)
                elif args.client == "perf_analyzer":
                    result = perf_analyzer_closed_loop(f"127.0.0.1:{port}", names[budget], input_data,
                                                       c, args.duration)
                else:
                    result = asyncio.run(closed_loop(url, path, image, c, args.duration))
                rows.append({"client": args.client, "budget": budget, "concurrency": c, **result})
                print(f"closed loop, budget {budget}, concurrency {c}: "
                      f"{result['throughput']:.1f} images/s", flush=True)
    finally:
        stop(proc, 60)
    return rows


def open_loop_rows(args, weights: Path, image: bytes) -> list[dict]:
    """Every offered rate of the open loop, against a server with a small queue. Requests carry
    the client timeout as their deadline, so the server also refuses those it cannot finish."""
    proc, port = serve(weights, args, args.open_queue_size)
    url = f"http://127.0.0.1:{port}"
    path = v1_path(args.model, args.open_budget, args.policy) + f"&timeout={args.timeout:g}"
    rows = []
    try:
        asyncio.run(closed_loop(url, path, image, 1, 1.0))
        for rate in args.rates:
            row = asyncio.run(open_loop(url, path, image, rate, args.duration, args.timeout,
                                        args.arrivals == "poisson"))
            rows.append(row)
            print(f"open loop, {rate:g} req/s offered: {row['throughput']:.1f} images/s, "
                  f"{row['rejected_fraction']:.0%} rejected", flush=True)
    finally:
        stop(proc, 60)
    return rows


def tool_versions() -> dict:
    """Versions of the load generators (hey has no version flag: its Debian package's)."""
    versions = {"httpx": httpx.__version__}
    if shutil.which("dpkg-query"):
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True,
                             text=True)
        versions["hey"] = out.stdout.strip() or None
    if shutil.which("perf_analyzer"):
        out = subprocess.run(["perf_analyzer", "--version"], capture_output=True, text=True)
        versions["perf_analyzer"] = (out.stdout + out.stderr).strip()
    return versions


def server_settings(args, queue_size: int) -> dict:
    """What the server under test runs with: its ACS_* environment, then the flags we pass."""
    settings = from_env(device="cpu", threads=args.threads, max_batch_size=args.max_batch_size,
                        max_queue_size=queue_size)
    return {k: getattr(settings, k) for k in ("device", "threads", "max_batch_size", "max_queue_size",
                                              "max_queue_delay_ms", "request_timeout_s", "reject_status")}


def meta(args, loadavg: tuple[float, ...]) -> dict:
    """The machine, the tools, and the server and client configuration of this run."""
    return {"note": "random weights, timing only" if not args.weights else "timing only",
            "cpus": os.cpu_count(), "loadavg_before": loadavg, "python": platform.python_version(),
            "torch": torch.__version__, "tools": tool_versions(), "client": args.client,
            "model": args.model, "weights": args.weights or "random", "policy": args.policy,
            "duration_s": args.duration,
            "server": {"closed_loop": server_settings(args, CLOSED_QUEUE_SIZE),
                       "open_loop": server_settings(args, args.open_queue_size)},
            "open_loop": {"budget": args.open_budget, "arrivals": args.arrivals,
                          "client_timeout_s": args.timeout, "request_timeout_param_s": args.timeout,
                          "rejected": "429/503", "timed_out": "client timeout or 504"}}


def print_tables(closed: list[dict], opened: list[dict], bare: dict[float, float]) -> None:
    print()
    print(markdown_table(
        ["client", "budget", "concurrency", "p50 ms", "p90 ms", "p99 ms", "images/s", "ok", "errors"],
        [[r["client"], r["budget"], r["concurrency"], fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p99_ms"]),
          f"{r['throughput']:.1f}", fmt(r["ok"], "d"), r["errors"] or 0] for r in closed]))
    if opened:
        print()
        print(markdown_table(
            ["offered req/s", "sent", "images/s", "p50 ms", "p99 ms", "rejected", "timed out",
             "reject p50 ms", "other errors", "send lag p99 ms"],
            [[f"{r['offered_rate']:g}", r["sent"], f"{r['throughput']:.1f}", fmt(r["p50_ms"]),
              fmt(r["p99_ms"]), f"{r['rejected_fraction']:.1%}", f"{r['timeout_fraction']:.1%}",
              fmt(r["reject_p50_ms"]), r["errors"] or 0, fmt(r["send_lag_p99_ms"])] for r in opened]))
    for budget, ms in bare.items():
        c1 = next((r for r in closed if r["budget"] == budget and r["concurrency"] == 1), None)
        if c1 and c1["p50_ms"] is not None:
            print(f"budget {budget}: bare model call p50 {ms:.2f} ms, {c1['client']} p50 at "
                  f"concurrency 1 {c1['p50_ms']:.2f} ms, overhead {c1['p50_ms'] - ms:.2f} ms")


def plot(closed: list[dict], opened: list[dict], path: str) -> None:
    """Left: closed-loop throughput against p99 per budget; right: open-loop throughput and
    rejection rate against the offered rate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for budget in dict.fromkeys(r["budget"] for r in closed):
        rows = [r for r in closed if r["budget"] == budget and r["p99_ms"] is not None]
        left.plot([r["throughput"] for r in rows], [r["p99_ms"] for r in rows], "o-",
                  label=f"budget {budget}")
        for r in rows:
            left.annotate(str(r["concurrency"]), (r["throughput"], r["p99_ms"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="throughput (images/s)", ylabel="p99 latency (ms)", yscale="log",
             title="closed loop (labels: concurrency)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    left.legend()
    offered = [r["offered_rate"] for r in opened]
    right.plot(offered, offered, ":", color="grey", label="offered")
    right.plot(offered, [r["throughput"] for r in opened], "o-", label="achieved")
    right.set(xlabel="offered rate (requests/s)", ylabel="images/s", title="open loop")
    if offered:
        right.set_xscale("log", base=2)
        right.set_xticks(offered, [f"{o:g}" for o in offered])
    rejected = right.twinx()
    rejected.plot(offered, [100 * r["rejected_fraction"] for r in opened], "s--", color="tab:red",
                  label="rejected")
    rejected.plot(offered, [100 * r["timeout_fraction"] for r in opened], "x--", color="tab:purple",
                  label="timed out")
    rejected.set(ylabel="% of requests", ylim=(0, 100))
    right.legend(loc="upper left")
    rejected.legend(loc="center left")
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS), help="checkpoint folders (default: shipped)")
    parser.add_argument("--model", default="acs_ranked_fastnet")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--client", choices=["httpx", "hey", "perf_analyzer"], default="httpx",
                        help="closed-loop load generator")
    parser.add_argument("--rates", nargs="*", type=float, default=[10, 20, 40, 80, 160],
                        help="open-loop offered rates in requests/s (none: skip the open loop)")
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--timeout", type=float, default=2.0, help="open-loop client timeout, s")
    parser.add_argument("--open-queue-size", type=int, default=16,
                        help="the open-loop server's --max-queue-size, in images")
    parser.add_argument("--open-budget", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--policy", default="threshold", choices=POLICIES)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG figure here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    loadavg = os.getloadavg()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = Path(args.weights)
        image = png_bytes()
        checkpoint = load_checkpoint(weights / args.model)
        bare = {b: bare_call_ms(checkpoint, b, args.policy, image) for b in args.budgets}
        closed = closed_loop_rows(args, tmp, weights, checkpoint, image)
        opened = open_loop_rows(args, weights, image) if args.rates else []
    print_tables(closed, opened, bare)
    if args.json:
        result = {"meta": meta(args, loadavg), "bare_ms": bare, "closed_loop": closed,
                  "open_loop": opened}
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(closed, opened, args.plot)


if __name__ == "__main__":
    main()
