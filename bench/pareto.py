"""Is the budget worth it? The budget-native model against dense networks trained on their own,
top-1 against measured latency, every model served as the server serves it.

One process, 1 thread by default: each model's serving executor (`executor_for`, in the
precision `dtype=auto` picks here), top-1 on the test split of --data (and on the shipped
sample photos), and the median batch-1 and batch-32 latency of the executor call, all models
timed round-robin over rotating test images. The dynamic model runs at each of --budgets under
the threshold policy.

The checks (issue 27):
- curve: at every budget the dynamic model is on or above the dense networks' accuracy-latency
  curve (top-1 interpolated linearly between the two dense networks around its latency);
- gain: at the latency of --reference (today's 64/256/256 `fastnet`), the dynamic model's
  top-1 (interpolated between its budgets) is >= 1.5 points above that network's;
- spread: against its own dense baseline, >= -0.3 points at budget 1.0, -1.0 at 0.5, -2.5 at
  0.25.

    OMP_NUM_THREADS=1 python bench/pareto.py --data ~/.cache/acs-serve/cifar10-jpeg-32px.safetensors \
        --json docs/performance/pareto.json --plot docs/performance/pareto.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from common import markdown_table, plot_by_batch, round_robin_ms
from engine_speed import SAMPLES, rotating, sample_images, test_images

from models.core.checkpoint import load_checkpoint, read_manifest
from models.engines.precision import serving_dtype
from models.engines.variants import engine_name, executor_for

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
GAIN = 1.5  # points over --reference at its latency
SPREAD = {1.0: 0.3, 0.5: 1.0, 0.25: 2.5}  # points the dynamic model may trail its dense baseline


def sample_labels(manifest: dict) -> torch.Tensor:
    """The class of each shipped sample photo, from its file name (<class>_NNNN.jpg)."""
    classes = manifest["classes"]
    return torch.tensor([classes.index(f.name.rsplit("_", 1)[0]) for f in sorted(SAMPLES.glob("*.jpg"))])


def top1(executor, images: torch.Tensor, labels: torch.Tensor, budget: float, batch: int = 250) -> float:
    """Top-1 (%) of the executor at `budget` (threshold policy)."""
    right = sum(int((executor(images[i : i + batch], budget=budget).argmax(1) == labels[i : i + batch]).sum())
                for i in range(0, len(images), batch))
    return 100 * right / len(images)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the polyline through `points` (x, y), sorted by x; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and x == points[0][0] else None


def measure(args) -> dict:
    dynamic = load_checkpoint(args.weights / args.dynamic)
    manifest = dynamic.manifest
    dense_names = args.dense or [manifest["dense_baseline"]]
    cpu = torch.device("cpu")
    executors, points = {}, []  # points: (model, budget)
    models = [(args.dynamic, dynamic)] + [(n, load_checkpoint(args.weights / n)) for n in dense_names]
    for name, ckpt in models:
        dtype = serving_dtype("auto", cpu, ckpt.manifest)
        executors[name] = (executor_for(ckpt.model, cpu, dtype, args.runtime, args.threads), dtype)
        points += [(name, b) for b in (args.budgets if name == args.dynamic else [1.0])]
    samples, sample_y = sample_images(manifest), sample_labels(manifest)
    if args.data:
        from training.data import load_dataset

        images, labels = test_images(args.data, manifest), load_dataset(args.data).test_y
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
    else:
        images, labels = samples, sample_y
    rows = {p: {"model": p[0], "budget": p[1], "engine": engine_name(executors[p[0]][0]),
                "dtype": str(executors[p[0]][1]).replace("torch.", ""),
                "top1": round(top1(executors[p[0]][0], images, labels, p[1]), 2),
                "samples_top1": round(top1(executors[p[0]][0], samples, sample_y, p[1]), 1)}
            for p in points}
    for n in args.batches:
        x = rotating(images, n)
        ms = round_robin_ms({p: (lambda x=x, p=p: executors[p[0]][0](x(), budget=p[1])) for p in points},
                            runs=args.runs)
        for p in points:
            rows[p][f"batch{n}_ms"] = round(ms[p], 3)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "dynamic": args.dynamic, "dense": dense_names, "reference": args.reference,
            "policy": "threshold", "top1_images": f"{args.data} test split" if args.data else
            f"{SAMPLES.relative_to(ROOT)}", "images": len(images), "samples": len(samples)}
    return {"meta": meta, "rows": list(rows.values()), "checks": checks(list(rows.values()), args, manifest)}


def checks(rows: list[dict], args, manifest: dict) -> dict:
    """The curve, gain and spread checks of the module docstring, per batch size."""
    ours = [r for r in rows if r["model"] == args.dynamic]
    dense = [r for r in rows if r["model"] != args.dynamic]
    baseline = next((r for r in dense if r["model"] == manifest.get("dense_baseline")), None)
    result = {}
    for n in args.batches:
        key = f"batch{n}_ms"
        curve = [(r[key], r["top1"]) for r in dense]
        above = []
        for r in ours:
            line = interpolate(curve, r[key])
            faster = [r2["top1"] for r2 in dense if r2[key] <= r[key]]  # dense networks at most as slow
            above.append({"budget": r["budget"], "ms": r[key], "top1": r["top1"],
                          "dense_at_ms": None if line is None else round(line, 2),
                          "met": (line is None or r["top1"] >= line - 1e-9)
                          and all(r["top1"] >= t for t in faster)})
        ref = next((r for r in dense if r["model"] == args.reference), None)
        gain = None
        if ref is not None:
            at = interpolate([(r[key], r["top1"]) for r in ours], ref[key])
            gain = {"reference_ms": ref[key], "reference_top1": ref["top1"],
                    "ours_top1": None if at is None else round(at, 2),
                    "points": None if at is None else round(at - ref["top1"], 2),
                    "met": at is not None and at - ref["top1"] >= GAIN}
        result[f"batch{n}"] = {"curve": above, "gain": gain}
    if baseline is not None:
        result["spread"] = [{"budget": b, "top1": r["top1"], "dense_top1": baseline["top1"],
                             "points": round(r["top1"] - baseline["top1"], 2),
                             "met": r["top1"] >= baseline["top1"] - allowed}
                            for b, allowed in SPREAD.items() for r in ours if r["budget"] == b]
    return result


def print_tables(result: dict) -> None:
    m = result["meta"]
    print(f"\n{m['dynamic']} (threshold) against dense {', '.join(m['dense'])}; top-1 on {m['top1_images']} "
          f"({m['images']} images), samples: {m['samples']} photos; {m['threads']} thread(s); {m['cpu']}\n")
    batches = [k for k in result["rows"][0] if k.endswith("_ms")]
    print(markdown_table(
        ["model", "budget", "engine", "dtype", "top-1 (%)", "samples top-1 (%)",
         *(f"{k[5:-3]} images (ms)" for k in batches)],
        [[r["model"], f"{r['budget']:g}", r["engine"], r["dtype"], f"{r['top1']:.2f}",
          f"{r['samples_top1']:.1f}", *(f"{r[k]:.3f}" for k in batches)] for r in result["rows"]]))
    for batch, check in result["checks"].items():
        if batch == "spread":
            continue
        print(f"\n{batch}: on or above the dense curve\n")
        print(markdown_table(["budget", "ms", "top-1", "dense at that ms", "met"],
                             [[f"{c['budget']:g}", f"{c['ms']:.3f}", f"{c['top1']:.2f}",
                               c["dense_at_ms"] or "outside", "yes" if c["met"] else "no"]
                              for c in check["curve"]]))
        g = check["gain"]
        if g:
            print(f"\n{batch}: at {m['reference']}'s {g['reference_ms']:.3f} ms, ours {g['ours_top1']} "
                  f"against {g['reference_top1']:.2f}: {g['points']} points (target >= {GAIN}: "
                  f"{'met' if g['met'] else 'not met'})")
    if "spread" in result["checks"]:
        print("\nagainst its dense baseline\n")
        print(markdown_table(["budget", "top-1", "dense", "points", "met"],
                             [[f"{s['budget']:g}", f"{s['top1']:.2f}", f"{s['dense_top1']:.2f}",
                               f"{s['points']:+.2f}", "yes" if s["met"] else "no"]
                              for s in result["checks"]["spread"]]))


def plot(result: dict, path: str) -> None:
    """Top-1 against batch-1 and batch-32 latency: the dynamic model as a line over its budgets,
    each dense network a point (joined as the dense curve)."""
    rows = result["rows"]
    dynamic = result["meta"]["dynamic"]
    batches = [int(k[5:-3]) for k in rows[0] if k.endswith("_ms")]
    flat = [{**r, "batch": n, "ms": r[f"batch{n}_ms"], "name": r["model"],
             "model": f"{dynamic} (budgets)" if r["model"] == dynamic else "dense networks"}
            for n in batches for r in sorted(rows, key=lambda r: r[f"batch{n}_ms"])]

    def names(ax, batch):  # each dense network's name beside its point
        for r in flat:
            if r["batch"] == batch and r["model"] == "dense networks":
                ax.annotate(r["name"], (r["ms"], r["top1"]), fontsize=7, xytext=(4, -8),
                            textcoords="offset points")

    plot_by_batch(flat, path, "ms", "top1", "median latency (ms), served precision", "top-1 (%)",
                  decorate=names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--dynamic", help="the budget-native model (default: the server's default)")
    parser.add_argument("--dense", nargs="+",
                        help="dense models (default: the dynamic model's dense_baseline)")
    parser.add_argument("--reference", default="fastnet", help="the dense network the gain is measured at")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runtime", default="auto", choices=("auto", "openvino", "torch"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100, help="timed calls per model and budget")
    parser.add_argument("--data", help="a dataset (or its cache) with the test split (default: top-1 on the "
                        "sample photos only)")
    parser.add_argument("--limit", type=int, help="the first N test images only")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the accuracy-latency plot here (PNG)")
    args = parser.parse_args(argv)
    if not args.dynamic:
        args.dynamic = next(f.parent.name for f in sorted(args.weights.glob("*/manifest.json"))
                            if read_manifest(f.parent).get("serve_default"))
    torch.set_num_threads(args.threads)
    result = measure(args)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
