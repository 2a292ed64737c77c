"""acs-serve against peer servers (FastAPI + OpenVINO, LitServe, TorchServe): same model, same
machine, same load.

Every server serves the same dense checkpoint (--dense, the shipped `fastnet` by default) with
one inference thread and one worker. FastAPI + OpenVINO is the server a user would write
(bench/peer_servers/fastapi_openvino.py: the dense network compiled whole in OpenVINO at its
best precision, one image per request, no batching). LitServe and TorchServe run the plain
PyTorch module in the precision acs-serve's dtype=auto picks for it, with the same largest
batch and batch delay as acs-serve (--max-queue-delay-ms, LitServe batch_timeout, TorchServe
maxBatchDelay). acs-serve also serves the budget-native model (--acs, the shipped default
`acs_ranked_fastnet`) at --budgets under --policy (threshold), as it serves it (its width
levels in OpenVINO). The peers decode and preprocess exactly as acs-serve does (service/imaging).

Servers run one at a time, each logging warnings only. Each is driven by `wrk` (a closed loop of
--concurrency connections, each posting the next of the 200 sample photos in
samples/cifar10-jpeg-test as a raw image/jpeg body: an input-adaptive model costs what its
inputs make it cost) for --duration seconds per concurrency, after a --warmup at the highest
one. The multi-image load posts multipart bodies of --multi consecutive photos. "Where the
time goes" times, in this process and round-robin before any server starts, the preprocessing
and the bare model call each server makes for one photo (the photos in turn); overhead = the
HTTP p50 at concurrency 1 minus both (HTTP, queues, batching, process hops, the load generator).
Goals (issue 26), against FastAPI + OpenVINO: at concurrency 1 our p50 over its p50 at most
LATENCY_GOALS[budget]; at concurrency 16 our req/s over its req/s at least
THROUGHPUT_GOALS[budget]. Then acs-serve alone, --multi-clients clients each posting
--multi images in one multipart request: images/s at budget 0.5 over images/s at 1.0 at
least MULTI_GOAL.

    OMP_NUM_THREADS=1 python bench/peers.py --json peers.json --plot peers.png
    OMP_NUM_THREADS=1 python bench/peers.py --peers fastapi-openvino --duration 5
    OMP_NUM_THREADS=1 python bench/peers.py --dense densenet40 --acs acs_densenet40 --budgets 1.0 0.5

Needs `wrk` (apt-get install wrk); a peer that is not installed (pip install litserve
torchserve torch-model-archiver; TorchServe also needs Java 17) is skipped with the reason.
Linux: stopping a peer checks /proc that no process of its group (Java, workers) is left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import httpx
import torch
from common import (
    fmt,
    free_port,
    markdown_table,
    png_bytes,
    round_robin_ms,
    start_acs_serve,
    stop,
    stop_group,
)
from load_clients import wrk_closed_loop
from peer_servers.classifier import Classifier

from models.core.budget import POLICIES
from models.core.checkpoint import load_checkpoint
from models.engines.precision import serving_dtype
from models.engines.variants import VariantExecutor, executor_for

PEER_DIR = Path(__file__).resolve().parent / "peer_servers"
PHOTOS = sorted((Path(__file__).resolve().parents[1] / "samples" / "cifar10-jpeg-test").glob("*.jpg"))

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
PEERS = ("fastapi-openvino", "litserve", "torchserve")
REFERENCE = "fastapi-openvino"  # the peer the goals are set against
LATENCY_GOALS = {1.0: 1.15, 0.5: 0.85, 0.25: 0.7}  # budget -> our p50 over its, concurrency 1
THROUGHPUT_GOALS = {1.0: 1.0, 0.5: 1.2}  # budget -> our req/s over its, concurrency 16
MULTI_GOAL = 1.3  # images/s at budget 0.5 over 1.0, clients posting several images each


@dataclass
class Target:
    model: str
    budget: float
    path: str  # URL path and query
    images: int = 1  # images per request (more: one multipart body, --multi-clients clients)


@dataclass
class Server:
    name: str
    start: Callable[[Path, int, object], subprocess.Popen]  # (folder, port, log) -> process
    targets: list[Target]
    group: bool  # started in its own process group: stop the whole group


def wait_predict(url: str, body: bytes, seconds: float, proc: subprocess.Popen) -> None:
    """Post body to url until it answers 200 (model loaded, worker up); fail early if proc exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.post(url, content=body, headers={"content-type": "image/png"},
                          timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer a prediction within {seconds:.0f} s")


def start_fastapi_openvino(weights: Path, args) -> Callable:
    def start(folder: Path, port: int, log) -> subprocess.Popen:
        cmd = [sys.executable, str(PEER_DIR / "fastapi_openvino.py"), "--weights", str(weights),
               "--port", str(port), "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        return subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return start


def start_litserve(weights: Path, args) -> Callable:
    def start(folder: Path, port: int, log) -> subprocess.Popen:
        cmd = [sys.executable, str(PEER_DIR / "litserve_app.py"), "--weights", str(weights),
               "--port", str(port), "--threads", str(args.threads),
               "--max-batch-size", str(args.max_batch_size),
               "--batch-timeout", str(max(args.batch_delay_ms, 1) / 1000)]  # at 0 it busy-polls
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        return subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return start


TORCHSERVE_CONFIG = """\
inference_address=http://127.0.0.1:{port}
management_address=http://127.0.0.1:{management}
metrics_address=http://127.0.0.1:{metrics}
model_store={store}
load_models={model}.mar
models={models}
default_workers_per_model=1
number_of_netty_threads=1
netty_client_threads=1
job_queue_size=1024
disable_token_authorization=true
install_py_dep_per_model=false
disable_system_metrics=true
enable_envvars_config=false
"""

# Warnings and errors only, as acs-serve and LitServe run here: TorchServe otherwise logs several
# lines per request (access log, metrics, worker timing) from its frontend
TORCHSERVE_LOG4J2 = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d %-5p %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def start_torchserve(weights: Path, args) -> Callable:
    def start(folder: Path, port: int, log) -> subprocess.Popen:
        """Archive handler, classifier.py and checkpoint; write its configuration; start it."""
        store = folder / "store"
        store.mkdir()
        extra = [PEER_DIR / "classifier.py", weights / "manifest.json", weights / "model.safetensors"]
        subprocess.run(["torch-model-archiver", "--model-name", args.dense, "--version", "1.0",
                        "--handler", str(PEER_DIR / "torchserve_handler.py"),
                        "--extra-files", ",".join(map(str, extra)), "--export-path", str(store)],
                       check=True, timeout=120, stdout=log, stderr=subprocess.STDOUT)
        models = {args.dense: {"1.0": {"defaultVersion": True, "marName": f"{args.dense}.mar",
                                  "minWorkers": 1, "maxWorkers": 1,
                                  "batchSize": args.max_batch_size,
                                  "maxBatchDelay": args.batch_delay_ms, "responseTimeout": 120}}}
        config = folder / "config.properties"
        config.write_text(TORCHSERVE_CONFIG.format(
            port=port, management=free_port(), metrics=free_port(), store=store, model=args.dense,
            models=json.dumps(models)))
        (folder / "log4j2.xml").write_text(TORCHSERVE_LOG4J2)
        # TMPDIR: torchserve keeps its pid file there; a private one keeps runs apart
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TMPDIR": str(folder)}
        cmd = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(store), "--log-config", str(folder / "log4j2.xml")]
        return subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return start


def missing(peer: str) -> str | None:
    """Why a peer cannot run here, or None."""
    if peer == "fastapi-openvino":
        return None if util.find_spec("openvino") else "pip install openvino"
    if peer == "litserve":
        return None if util.find_spec("litserve") else "pip install litserve"
    for tool in ("torchserve", "torch-model-archiver", "java"):
        if shutil.which(tool) is None:
            return f"{tool} not found (pip install torchserve torch-model-archiver; Java 17)"
    return None


def ours(args) -> list[tuple[str, float]]:
    """(model, budget) pairs acs-serve is measured on."""
    return [(args.dense, 1.0)] + [(args.acs, b) for b in args.budgets]


def servers(weights: Path, args, skipped: dict) -> list[Server]:
    """acs-serve, then each installed peer of --peers (the others go into `skipped`)."""
    def acs(folder: Path, port: int, log) -> subprocess.Popen:
        return start_acs_serve(weights, port, args.threads, args.max_batch_size, log=log,
                               extra=("--max-queue-delay-ms", str(args.batch_delay_ms)))

    def path(m: str, b: float) -> str:
        return f"/v1/models/{m}/predict?budget={b}&policy={args.policy}"

    targets = [Target(m, b, path(m, b)) for m, b in ours(args)]
    if args.multi > 1:
        targets += [Target(args.acs, b, path(args.acs, b), args.multi) for b in (1.0, 0.5)]
    out = [Server("acs-serve", acs, targets, group=False)]
    paths = {"fastapi-openvino": (start_fastapi_openvino, "/predict"),
             "litserve": (start_litserve, "/predict"),
             "torchserve": (start_torchserve, f"/predictions/{args.dense}")}
    for name in args.peers:
        reason = missing(name)
        if reason:
            print(f"skipping {name}: {reason}", flush=True)
            skipped[name] = reason
            continue
        factory, path = paths[name]
        out.append(Server(name, factory(weights / args.dense, args), [Target(args.dense, 1.0, path)],
                          group=True))
    return out


def bare_ms(weights: Path, args) -> dict:
    """In this process, round-robin: median ms of preprocessing a photo ("preprocess") and of
    each server's model call on one ((acs-serve or peer, model, budget)), the photos in turn."""
    peer = Classifier(weights / args.dense, args.threads)  # LitServe's and TorchServe's code path
    bodies = [p.read_bytes() for p in PHOTOS]
    inputs = [peer.preprocess(b)[None] for b in bodies]
    turn = {"i": 0}

    def x() -> torch.Tensor:
        turn["i"] = (turn["i"] + 1) % len(inputs)
        return inputs[turn["i"]]

    calls = {"preprocess": lambda: peer.preprocess(bodies[turn["i"]]),
             ("peer", args.dense, 1.0): lambda: peer.predict(x())}
    if util.find_spec("openvino"):
        from peer_servers.fastapi_openvino import compile_dense

        request = compile_dense(str(weights / args.dense), args.threads)[1]
        calls[(REFERENCE, args.dense, 1.0)] = lambda: request.infer(x().numpy(), share_inputs=True)
    for model, budget in ours(args):
        checkpoint = load_checkpoint(weights / model)
        dtype = serving_dtype("auto", torch.device("cpu"), checkpoint.manifest)  # as served
        executor = executor_for(checkpoint.model, torch.device("cpu"), dtype, "auto", args.threads)
        cast = torch.float32 if isinstance(executor, VariantExecutor) else dtype
        calls[("acs-serve", model, budget)] = (
            lambda e=executor, c=cast, b=budget: torch.softmax(e(x().to(c), budget=b, policy=args.policy), 1))
    return round_robin_ms(calls)


def where_time_goes(rows: list[dict], bare: dict) -> list[dict]:
    """Per server and target at concurrency 1: bare preprocessing and model call, and the rest
    of the HTTP p50 (server, transport, load generator)."""
    out = []
    for r in rows:
        if r["concurrency"] == 1 and r["ok"]:
            key = r["server"] if r["server"] in ("acs-serve", REFERENCE) else "peer"
            model = bare.get((key, r["model"], r["budget"]))
            if model is None:
                continue
            out.append({"server": r["server"], "model": r["model"], "budget": r["budget"],
                        "preprocess_ms": bare["preprocess"], "model_ms": model,
                        "http_p50_ms": r["p50_ms"],
                        "overhead_ms": r["p50_ms"] - bare["preprocess"] - model})
    return out


BOUNDARY = "acsbenchboundary"


def multipart(photos: list[Path], count: int, folder: Path) -> list[Path]:
    """multipart/form-data bodies (field "file") of `count` consecutive photos each."""
    paths = []
    for i in range(0, len(photos) - count + 1, count):
        parts = [(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n'
                  "Content-Type: image/jpeg\r\n\r\n").encode() + p.read_bytes() + b"\r\n"
                 for p in photos[i : i + count]]
        path = folder / f"body-{count}-{i}.multipart"
        path.write_bytes(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
        paths.append(path)
    return paths


def measure(server: Server, folder: Path, body: Path, args) -> list[dict]:
    """Start the server, warm up and load each of its targets, stop it (always)."""
    folder.mkdir()
    rows = []
    image = body.read_bytes()
    with open(folder / "server.log", "wb") as log:
        port = free_port()
        proc = server.start(folder, port, log)
        try:
            for target in server.targets:
                url = f"http://127.0.0.1:{port}{target.path}"
                wait_predict(url, image, args.start_timeout, proc)
                send, ctype, levels = PHOTOS, "image/jpeg", args.concurrency
                if target.images > 1:
                    send, levels = multipart(PHOTOS, target.images, folder), [args.multi_clients]
                    ctype = f"multipart/form-data; boundary={BOUNDARY}"
                wrk_closed_loop(url, send, max(levels), args.warmup, ctype)
                for c in levels:
                    load = round(os.getloadavg()[0], 2)  # the machine is shared: judge by it
                    result = wrk_closed_loop(url, send, c, args.duration, ctype)
                    rows.append({"server": server.name, "model": target.model,
                                 "budget": target.budget, "concurrency": c, "loadavg_1m": load,
                                 **({"images": target.images} if target.images > 1 else {}),
                                 **result})
                    print(f"{server.name} {target.model} budget {target.budget} concurrency {c} "
                          f"({target.images} image(s) a request): "
                          f"{result['throughput']:.1f} req/s, p99 {fmt(result['p99_ms'])} ms", flush=True)
        finally:
            if server.group:
                if not stop_group(proc):
                    print(f"warning: processes of {server.name} (group {proc.pid}) survived SIGKILL")
            else:
                stop(proc, 60)
    return rows


def versus_peers(rows: list[dict]) -> list[dict]:
    """Ours against the reference peer (FastAPI + OpenVINO) at the same concurrency: p50 and
    req/s ratios, and the goal where one is set (latency at concurrency 1, req/s at 16)."""
    out = []
    for ours in (r for r in rows if r["server"] == "acs-serve" and r["ok"] and "images" not in r):
        peer = next((r for r in rows if r["server"] == REFERENCE and r["ok"]
                     and r["concurrency"] == ours["concurrency"]), None)
        if peer is None:
            continue
        p50, rps = ours["p50_ms"] / peer["p50_ms"], ours["throughput"] / peer["throughput"]
        goal = met = None
        if ours["concurrency"] == 1 and ours["budget"] in LATENCY_GOALS:
            goal = f"p50 <= {LATENCY_GOALS[ours['budget']]}x"
            met = p50 <= LATENCY_GOALS[ours["budget"]]
        elif ours["concurrency"] == 16 and ours["budget"] in THROUGHPUT_GOALS:
            goal = f"req/s >= {THROUGHPUT_GOALS[ours['budget']]}x"
            met = rps >= THROUGHPUT_GOALS[ours["budget"]]
        out.append({"model": ours["model"], "budget": ours["budget"], "concurrency": ours["concurrency"],
                    "peer": REFERENCE, "p50_ratio": p50, "throughput_ratio": rps, "goal": goal,
                    "met": met})
    return out


def multi_image(rows: list[dict]) -> dict | None:
    """Images/s of acs-serve's multi-image requests at budget 0.5 over 1.0, against MULTI_GOAL."""
    rate = {r["budget"]: r["throughput"] * r["images"] for r in rows if r.get("images") and r["ok"]}
    if 1.0 not in rate or 0.5 not in rate:
        return None
    ratio = rate[0.5] / rate[1.0]
    return {"images_per_s": rate, "ratio": ratio, "goal": MULTI_GOAL, "met": ratio >= MULTI_GOAL}


def print_tables(result: dict) -> None:
    meta = result["meta"]
    print(f"\n{meta['cpus']} CPUs, load average before {meta['loadavg_before']}, after "
          f"{meta['loadavg_after']}; {meta['threads']} torch thread(s); max batch "
          f"{meta['max_batch_size']}, batch delay {meta['batch_delay_ms']} ms; {meta['weights']}\n")
    print(markdown_table(
        ["server", "model", "budget", "concurrency", "images/request", "req/s", "p50 ms", "p90 ms", "p99 ms",
         "ok", "errors"],
        [[r["server"], r["model"], r["budget"], r["concurrency"], r.get("images", 1),
          f"{r['throughput']:.1f}", fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p99_ms"]), r["ok"],
          r["errors"] or 0]
         for r in result["rows"]]))
    if result["where_time_goes"]:
        print("\nWhere the time goes at concurrency 1 (preprocess, model: medians of bare calls in "
              "one process, round-robin; overhead: HTTP p50 minus both)\n")
        print(markdown_table(
            ["server", "model", "budget", "preprocess ms", "model ms", "HTTP p50 ms", "overhead ms"],
            [[w["server"], w["model"], w["budget"], f"{w['preprocess_ms']:.2f}", f"{w['model_ms']:.2f}",
              f"{w['http_p50_ms']:.2f}", f"{w['overhead_ms']:.2f}"] for w in result["where_time_goes"]]))
    if result["versus"]:
        print(f"\nacs-serve over {REFERENCE} at the same concurrency\n")
        print(markdown_table(
            ["model", "budget", "concurrency", "p50 ratio", "req/s ratio", "goal", "met"],
            [[v["model"], v["budget"], v["concurrency"], f"{v['p50_ratio']:.2f}",
              f"{v['throughput_ratio']:.2f}", v["goal"] or "-",
              "-" if v["met"] is None else ("yes" if v["met"] else "no")]
             for v in result["versus"]]))
    multi = result.get("multi")
    if multi:
        rates = ", ".join(f"{rate:.0f} at budget {b}" for b, rate in multi["images_per_s"].items())
        print(f"\nMulti-image requests: images/s {rates}; 0.5 over 1.0 {multi['ratio']:.2f} "
              f"(goal >= {multi['goal']}: {'met' if multi['met'] else 'not met'})")
    for peer, reason in meta["skipped"].items():
        print(f"\n{peer} skipped: {reason}")


def plot(rows: list[dict], path: str) -> None:
    """Throughput vs p99, one line per server/model/budget (peers dashed), one point per
    concurrency."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    series = dict.fromkeys((r["server"], r["model"], r["budget"]) for r in rows if r["ok"])
    for server, model, budget in series:
        points = [r for r in rows if (r["server"], r["model"], r["budget"]) == (server, model, budget)
                  and r["ok"]]
        xs, ys = [r["p99_ms"] for r in points], [r["throughput"] for r in points]
        ax.plot(xs, ys, marker="o", linestyle="-" if server == "acs-serve" else "--",
                label=f"{server}: {model}, budget {budget}")
        for r, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"c={r['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("p99 latency (ms, log scale)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title("On the CPU, closed loop (wrk, the sample photos in turn)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def versions() -> dict:
    """Versions of torch, the peers and the tools, where installed."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("litserve", "torchserve", "torch-model-archiver"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    for name, cmd in {"wrk": ["dpkg-query", "-W", "-f", "${Version}", "wrk"],
                      "java": ["java", "-version"]}.items():
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            out[name] = (done.stdout or done.stderr).splitlines()[0] if done.returncode == 0 else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[name] = None
    return out


def batching(args) -> dict:
    """Each server's batching settings, as this script sets them."""
    n, ms = args.max_batch_size, args.batch_delay_ms
    return {"acs-serve": f"--max-batch-size {n} --max-queue-delay-ms {ms} (from the first queued "
                         "request's arrival); one inference thread",
            "litserve": f"LitAPI(max_batch_size={n}, batch_timeout={max(ms, 1) / 1000}) (from when its "
                        "loop starts collecting); 1 worker, 1 API server process",
            "torchserve": f"batchSize={n}, maxBatchDelay={ms} ms (from the batch's first job); "
                          "1 worker, 1 netty thread, 1 netty client thread"}


def run(args) -> dict:
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="acs-peers-") as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights"  # only the two models, so acs-serve loads nothing else
        weights.mkdir()
        for model in dict.fromkeys((args.dense, args.acs)):
            (weights / model).symlink_to((args.weights / model).resolve(), target_is_directory=True)
        body = tmp / "body.png"
        body.write_bytes(png_bytes())
        bare = bare_ms(weights, args)
        for server in servers(weights, args, skipped):
            try:
                rows += measure(server, tmp / server.name, body, args)
            except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
                log = (tmp / server.name / "server.log").read_text(errors="replace")[-2000:]
                print(f"{server.name} failed: {e}\n{log}", flush=True)
                skipped[server.name] = f"failed: {e}"
    meta = {"cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in args.loadavg_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "versions": versions(),
            "threads": args.threads, "max_batch_size": args.max_batch_size,
            "batch_delay_ms": args.batch_delay_ms, "batching": batching(args), "policy": args.policy,
            "budgets": args.budgets,
            "concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup,
            "load_generator": "wrk (closed loop, keep-alive, the sample photos in turn as raw "
                              "image/jpeg bodies; multipart bodies of --multi photos)",
            "weights": f"{args.weights}: {args.dense} (every server), {args.acs} (acs-serve)",
            "peer_model": "fastapi-openvino: the dense network compiled whole in OpenVINO; "
                          "litserve, torchserve: eager torch module, eval, no_grad; acs-serve: as "
                          "served (its engine)",
            "skipped": skipped}
    return {"meta": meta, "rows": rows, "where_time_goes": where_time_goes(rows, bare),
            "versus": versus_peers(rows), "multi": multi_image(rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="checkpoint folders")
    parser.add_argument("--dense", default="fastnet", help="the dense model every server serves")
    parser.add_argument("--acs", default="acs_ranked_fastnet", help="the ACS model acs-serve also serves")
    parser.add_argument("--policy", default="threshold", choices=POLICIES)
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                        help="budgets for the ACS model (the dense one runs at 1.0)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--multi", type=int, default=8,
                        help="images per request of the multi-image load (1: none)")
    parser.add_argument("--multi-clients", type=int, default=4, help="clients of the multi-image load")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per target, first")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-delay-ms", type=int, default=0,
                        help="longest wait for a batch to fill, every batching server (acs-serve's "
                             "default 0; LitServe gets at least 1: it busy-polls at 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds per server")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a throughput-vs-p99 PNG here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    if min(args.concurrency) < 1 or args.duration <= 0 or args.batch_delay_ms < 0:
        parser.error("concurrency must be >= 1, duration > 0, batch delay >= 0")
    torch.set_num_threads(args.threads)
    args.loadavg_before = os.getloadavg()
    result = run(args)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result["rows"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
