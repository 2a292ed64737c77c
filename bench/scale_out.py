"""Scale-out on one machine: throughput of N acs-serve replicas behind nginx, N = 1, 2, ...

A stand-in for a cluster: starts the largest N of `python -m service` replicas on loopback
ports (one torch thread each), then for each N runs nginx (deploy/scaleout/nginx.conf.template,
least_conn over the first N replicas, as an ordinary process with a temporary prefix) and
drives it with a closed loop of --concurrency clients, each posting one 32x32 PNG at a time
(budgets cycling through --budgets) for --duration seconds or --max-requests requests. With
the `prometheus` binary present, a Prometheus with the shipped config scrapes every replica
and the script reports how the requests spread over them. Loopback only; every loop is
bounded in time and count.

    OMP_NUM_THREADS=1 python bench/scale_out.py --replicas 1 2 --json scale_out.json

Every replica serves the shipped checkpoints (`weights/`, or --weights); the clients post to
--model (the shipped default, acs_ranked_fastnet).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template

import httpx
import yaml
from common import ROOT, free_port, markdown_table, percentile, png_bytes, start_acs_serve, stop, wait_http

TEMPLATE = ROOT / "deploy" / "scaleout" / "nginx.conf.template"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PREDICT = r'route=~".+/(predict|infer)"'


def start_nginx(prefix: Path, port: int, replica_ports: list[int], workers: int) -> subprocess.Popen:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # nginx's workers then run as "nobody": let them into the prefix
        for path in [prefix, *prefix.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=5s;"
                        for p in replica_ports)
    conf = Template(TEMPLATE.read_text()).substitute(
        prefix=str(prefix), listen=f"127.0.0.1:{port}", servers=servers, workers=workers)
    (prefix / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                             str(prefix / "error.log")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/nginx_status", 15, proc)
    return proc


def start_prometheus(prefix: Path, port: int, replica_ports: list[int]) -> subprocess.Popen:
    """A Prometheus with the shipped config, its acs-serve job pointed at the replicas."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / "rules.yml")]
    config["scrape_configs"] = [
        {"job_name": "acs-serve",
         "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in replica_ports]}]}]
    (prefix / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [shutil.which("prometheus"), f"--config.file={prefix / 'prometheus.yml'}",
           f"--storage.tsdb.path={prefix / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
           "--log.level=warn"]
    log = open(prefix / "prometheus.log", "wb")  # noqa: SIM115 (closed with the temp dir)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/-/ready", 30, proc)
    return proc


async def closed_loop(url: str, model: str, body: bytes, budgets: list[float], policy: str,
                      concurrency: int, seconds: float, max_requests: int) -> dict:
    """`concurrency` clients, each with one request in flight, until time or count runs out."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    path = f"/v1/models/{model}/predict"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    stop_at = start + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at and sent < max_requests:
                budget = budgets[sent % len(budgets)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, content=body,
                                          params={"budget": budget, "policy": policy},
                                          headers={"content-type": "image/png"})
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                if code == "200":
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"ok": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "throughput": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 0.5) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3}


def wait_scraped(prom_url: str, targets: int, seconds: float = 30) -> None:
    """Prometheus applies new targets every 5 s: wait until each replica has been scraped."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = httpx.get(f"{prom_url}/api/v1/query", params={"query": 'up{job="acs-serve"} == 1'},
                      timeout=5).json()
        if len(r.get("data", {}).get("result", [])) >= targets:
            return
        time.sleep(0.5)
    raise TimeoutError("Prometheus did not scrape every replica")


def per_replica(prom_url: str, seconds: float) -> dict[str, float]:
    """Requests each replica served over the last `seconds`, from Prometheus."""
    window = f"{max(int(seconds), 2)}s"
    query = (f'sum by (instance) (increase(acs_requests_total{{{PREDICT}, code="200"}}'
             f"[{window}]))")
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": query}, timeout=10).json()
    return {s["metric"]["instance"]: round(float(s["value"][1]))
            for s in r.get("data", {}).get("result", [])}


def run(args) -> dict:
    image = png_bytes()
    most = max(args.replicas)
    use_prometheus = args.prometheus and shutil.which("prometheus") is not None
    rows = []
    with tempfile.TemporaryDirectory(prefix="acs-scaleout-") as tmp:
        tmp = Path(tmp)
        weights = Path(args.weights)
        ports = [free_port() for _ in range(most)]
        log = open(tmp / "replicas.log", "wb")  # noqa: SIM115
        replicas = [start_acs_serve(weights, p, args.threads, args.max_batch_size, log=log) for p in ports]
        procs = list(replicas)
        try:
            for proc, port in zip(replicas, ports, strict=True):
                wait_http(f"http://127.0.0.1:{port}/readyz", 180, proc)
            prom_url = None
            if use_prometheus:
                prom_port = free_port()
                (tmp / "prometheus").mkdir()
                procs.append(start_prometheus(tmp / "prometheus", prom_port, ports))
                prom_url = f"http://127.0.0.1:{prom_port}"
                wait_scraped(prom_url, most)
            if args.direct:
                url = f"http://127.0.0.1:{ports[0]}"
                asyncio.run(closed_loop(url, args.model, image, args.budgets, args.policy,
                                        args.concurrency, args.warmup, args.max_requests))
                result = asyncio.run(closed_loop(url, args.model, image, args.budgets, args.policy,
                                                 args.concurrency, args.duration,
                                                 args.max_requests))
                rows.append({"replicas": 1, "via": "direct", **result})
                print(f"direct to 1 replica: {result['throughput']:.1f} req/s", flush=True)
            for n in args.replicas:
                prefix = tmp / f"nginx-{n}"
                prefix.mkdir()
                lb_port = free_port()
                nginx = start_nginx(prefix, lb_port, ports[:n], args.nginx_workers)
                try:
                    url = f"http://127.0.0.1:{lb_port}"
                    asyncio.run(closed_loop(url, args.model, image, args.budgets, args.policy,
                                            args.concurrency, args.warmup, args.max_requests))
                    result = asyncio.run(closed_loop(url, args.model, image, args.budgets,
                                                     args.policy, args.concurrency,
                                                     args.duration, args.max_requests))
                finally:
                    stop(nginx, 10)
                row = {"replicas": n, "via": "nginx", **result}
                if prom_url:
                    time.sleep(2.5)  # two more scrapes
                    row["per_replica"] = per_replica(prom_url, result["seconds"] + 2)
                rows.append(row)
                print(f"{n} replica(s) behind nginx: {result['throughput']:.1f} req/s", flush=True)
        finally:
            for proc in reversed(procs):
                stop(proc)
            log.close()
    base = next((r["throughput"] for r in rows if r["via"] == "nginx"), None)
    for r in rows:
        r["speedup"] = r["throughput"] / base if base else None
    return {"meta": {"cpus": os.cpu_count(), "loadavg_before": args.loadavg_before,
                     "python": platform.python_version(), "model": args.model,
                     "weights": args.weights, "budgets": args.budgets,
                     "policy": args.policy, "concurrency": args.concurrency,
                     "duration_s": args.duration, "threads_per_replica": args.threads,
                     "max_batch_size": args.max_batch_size, "nginx_workers": args.nginx_workers,
                     "prometheus": use_prometheus},
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", nargs="+", type=int, default=[1, 2],
                        help="replica counts to measure (this machine: as many as its cores)")
    parser.add_argument("--weights", default=str(ROOT / "weights"),
                        help="folder of checkpoint folders every replica serves")
    parser.add_argument("--model", default="acs_ranked_fastnet", help="the model the clients post to")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--policy", default="topk")
    parser.add_argument("--concurrency", type=int, default=16, help="clients, for every N")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per N")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each N")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap per measurement")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure one replica without nginx")
    parser.add_argument("--prometheus", action=argparse.BooleanOptionalAction, default=True,
                        help="scrape the replicas with Prometheus (when installed)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        print("nginx not found: apt-get install nginx", file=sys.stderr)
        return 2
    if min(args.replicas) < 1 or args.concurrency < 1 or args.duration <= 0:
        parser.error("replicas and concurrency must be >= 1, duration > 0")
    args.loadavg_before = os.getloadavg()
    result = run(args)
    print(f"\n{os.cpu_count()} CPUs, load average before: "
          f"{' '.join(f'{v:.2f}' for v in args.loadavg_before)}; "
          f"{args.concurrency} clients, budgets {args.budgets} ({args.policy})\n")
    print(markdown_table(
        ["replicas", "via", "req/s", "speedup", "p50 ms", "p99 ms", "ok", "errors", "per replica"],
        [[r["replicas"], r["via"], f"{r['throughput']:.1f}", f"{r['speedup']:.2f}", f"{r['p50_ms']:.1f}",
          f"{r['p99_ms']:.1f}", r["ok"], r["errors"] or 0,
          " / ".join(str(v) for _, v in sorted(r.get("per_replica", {}).items())) or "-"]
         for r in result["rows"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
