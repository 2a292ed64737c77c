"""Does skipping pay? Latency of the served executor vs budget, and vs the masked reference.

For each model, batch size and budget: median latency of the executor the server runs (the
compact executor; for a network of dense variants, its engine: OpenVINO on the CPU), its ratio to
budget 1.0 and to the masked reference (which computes every channel and multiplies by the
mask), the executed-MAC ratio, the share of time spent in the gates, and for batches the
latency of running every sample alone (per_sample_ms) instead of batched/grouped ops. Configurations are
timed round-robin, so drift on a shared machine hits them all alike.

    python bench/skip_speed.py --plot skip.png       # CPU, batch 1 and 32, table and plot
    python bench/skip_speed.py --models weights/acs_fastnet weights/fastnet --baseline weights/fastnet
    python bench/skip_speed.py --json out.json --device cuda --batch 1 256

`--baseline` adds vs_baseline: latency over that (dense) model's latency at the same batch,
served the fastest way (the best of --dtypes). `--dtypes float32 bfloat16` times each model in
each serving dtype (vs_float32: over the same model, batch and budget in float32).

    OMP_NUM_THREADS=1 python bench/skip_speed.py --dtypes float32 bfloat16 --baseline weights/fastnet
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import markdown_table, plot_by_batch

from models.core.budget import POLICIES
from models.core.checkpoint import load_checkpoint
from models.core.registry import create_model
from models.engines.allocator import keep_freed_memory
from models.engines.compact import CompactExecutor, compact
from models.engines.precision import DTYPES
from models.engines.variants import executor_for

MODELS = {
    "acs_densenet40": lambda: create_model("acs_densenet40", gate="acs"),
    "acs_densenet40_cheap": lambda: create_model("acs_densenet40", gate="cheap"),
    "densenet40": lambda: create_model("densenet40"),
    "g_resnext29": lambda: create_model("g_resnext29", gate="acs"),
}


SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "cifar10-jpeg-test"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GateTimer:
    """Wraps the executor's gate steps and sums the time spent in them."""

    def __init__(self, executor, device) -> None:
        self.total = 0.0
        for step in executor.steps if isinstance(executor, CompactExecutor) else []:
            if step.gate is not None:
                step.gate = self._wrap(step.gate, device)

    def _wrap(self, fn, device):
        def timed(state):
            sync(device)
            start = time.perf_counter()
            out = fn(state)
            sync(device)
            self.total += time.perf_counter() - start
            return out
        return timed


def load(name: str, device: torch.device, dtype: torch.dtype):
    """(model, manifest or None): a factory name, or a checkpoint folder."""
    if name in MODELS:
        return MODELS[name]().to(device, dtype).eval(), None
    checkpoint = load_checkpoint(name, device)
    return checkpoint.model.to(dtype), checkpoint.manifest


def inputs(args, manifest: dict | None, batch: int, count: int, device, dtype) -> list[torch.Tensor]:
    """`count` batches: real images from --images preprocessed as the server does (the
    threshold policy's cost depends on the image), cycling; random ones without them."""
    if not args.images or manifest is None:
        return [torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)]
    from service.imaging import preprocess

    files = sorted(Path(args.images).glob("*.jpg"))
    images = preprocess([f.read_bytes() for f in files], manifest, 10**8).to(device, dtype)
    return [images[(i * batch + torch.arange(batch)) % len(images)] for i in range(count)]


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for name, dtype_name in [(n, d) for n in args.models for d in args.dtypes]:
        dtype = DTYPES[dtype_name]
        model, manifest = load(name, device, dtype)
        if model.variants() is not None:  # served by its engine (OpenVINO on the CPU)
            model = model.float()
            executor = executor_for(model, device, dtype)
        else:
            executor = compact(model)
        timer = GateTimer(executor, device)
        budgets = sorted({min(max(b, model.floor()), 1.0) for b in args.budgets}
                         | ({model.floor()} if model.gated else set()), reverse=True)
        if not model.gated:
            budgets = [1.0]
        for batch in args.batch:
            repeats = args.repeat if batch < 16 else max(3, args.repeat // 4)
            xs = inputs(args, manifest, batch, repeats, device, dtype)
            configs = [("reference", 1.0)] + [("compact", b) for b in budgets]
            if batch > 1:
                configs += [("per_sample", b) for b in budgets]
            times = {c: [] for c in configs}
            gate_times = {c: [] for c in configs}

            def call(kind, b, r=0, model=model, executor=executor, xs=xs):
                x = xs[r % len(xs)]
                if kind == "reference":
                    with torch.no_grad():
                        return model(x.to(next(model.parameters()).dtype), budget=b, policy=args.policy)
                return executor(x, budget=b, policy=args.policy, per_sample=kind == "per_sample")

            for c in configs:
                for _ in range(args.warmup):
                    call(*c)
            for r in range(repeats):
                for c in configs:
                    timer.total = 0.0
                    sync(device)
                    start = time.perf_counter()
                    call(*c, r)
                    sync(device)
                    times[c].append(time.perf_counter() - start)
                    gate_times[c].append(timer.total)
            ref_ms = statistics.median(times[configs[0]]) * 1e3
            full_ms = statistics.median(times[("compact", budgets[0])]) * 1e3
            for c in configs[1 : len(budgets) + 1]:
                ratios = [executor(x, budget=c[1], policy=args.policy, return_info=True)[1].cost.ratio
                          for x in xs]
                ms = statistics.median(times[c]) * 1e3
                per_sample = times.get(("per_sample", c[1]))
                rows.append({
                    "model": name, "dtype": dtype_name, "device": str(device), "batch": batch,
                    "policy": args.policy,
                    "budget": round(c[1], 4), "mac_ratio": round(float(torch.cat(ratios).mean()), 4),
                    "ms": round(ms, 3), "vs_budget_1": round(ms / full_ms, 3),
                    "vs_reference": round(ms / ref_ms, 3), "reference_ms": round(ref_ms, 3),
                    "gate_share": round(statistics.median(gate_times[c]) * 1e3 / ms, 3),
                    "images_per_s": round(batch / ms * 1e3, 1),
                    "per_sample_ms": round(statistics.median(per_sample) * 1e3, 3)
                    if per_sample else None,
                })
    if args.baseline:  # the dense baseline served the fastest way, at each batch size
        base = {}
        for r in rows:
            if r["model"] == args.baseline and r["budget"] == 1.0:
                base[r["batch"]] = min(base.get(r["batch"], r["ms"]), r["ms"])
        for r in rows:
            r["vs_baseline"] = round(r["ms"] / base[r["batch"]], 3)
    fp32 = {(r["model"], r["batch"], r["budget"]): r["ms"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        key = (r["model"], r["batch"], r["budget"])
        r["vs_float32"] = round(r["ms"] / fp32[key], 3) if key in fp32 else None
    return rows


def table(rows: list[dict]) -> str:
    head = ("model", "dtype", "device", "batch", "budget", "mac_ratio", "ms", "vs_budget_1",
            "vs_baseline", "vs_float32", "vs_reference", "gate_share", "images_per_s", "per_sample_ms")
    return markdown_table(list(head), [[r.get(h) for h in head] for r in rows])


def plot(rows: list[dict], path: str) -> None:
    """Latency relative to budget 1.0 against the executed-MAC ratio, a panel per batch size."""
    gated_models = {r["model"] for r in rows if r["budget"] < 1.0}
    gated = [{**r, "model": f"{r['model']} ({r['dtype']})"} for r in rows if r["model"] in gated_models]
    plot_by_batch(gated, path, "mac_ratio", "vs_budget_1", "executed-MAC ratio",
                  "latency / latency at budget 1.0",
                  decorate=lambda ax, _: ax.plot([0, 1], [0, 1], "k:", lw=1, label="time = MACs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["weights/acs_fastnet", "weights/fastnet"],
                        help=f"names ({', '.join(MODELS)}) or checkpoint folders")
    parser.add_argument("--baseline", help="a model of --models to compare every latency with")
    parser.add_argument("--images", default=str(SAMPLES),
                        help="folder of .jpg images to time checkpoints on ('' for random inputs)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--policy", default="topk", choices=POLICIES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the rows and the machine here")
    parser.add_argument("--plot", help="write a PNG of relative latency against MACs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()
    rows = measure(args)
    print(table(rows))
    if args.json:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "threads": args.threads, "cuda": torch.cuda.get_device_name()
                if torch.cuda.is_available() else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
