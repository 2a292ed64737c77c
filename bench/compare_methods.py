"""Accuracy against measured latency: the dynamic methods side by side on the same test images.

For each checkpoint folder (exported by `acs-train export`) and budget, runs the compact
executor (what the server runs) over the same --images test images, in batches of each
--batch size, and reports top-1, the mean budget ratio (in the model's budget unit: MACs,
or BitOps for DFS), the executed-MAC ratio and the measured milliseconds per batch and per
image. Configurations are timed round-robin over the batches, so drift on a shared machine
hits them all alike. The same images give the accuracy and the latency.

    python bench/compare_methods.py --data .data/cifar10-jpeg --models weights/a weights/b \\
        --json bench/results/compare.json --plot bench/results/compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import markdown_table, plot_by_batch

from models.core.budget import POLICIES
from models.core.checkpoint import load_checkpoint
from models.engines.compact import compact
from training.data import load_dataset, normalize


def budgets_of(model, wanted: list[float]) -> list[float]:
    """The wanted budgets a model can honour (the floor for those below it), high to low."""
    if not model.gated:
        return [1.0]
    return sorted({round(max(b, model.floor()), 4) for b in wanted if b <= 1.0}, reverse=True)


@torch.no_grad()
def measure(folder: str, x: torch.Tensor, labels: torch.Tensor, budgets: list[float], batch: int,
            policy: str, repeat: int) -> list[dict]:
    """One model: top-1, cost and median ms per batch for each budget."""
    ckpt = load_checkpoint(folder)
    model, manifest = ckpt.model, ckpt.manifest
    x = normalize(x, manifest["input"]["mean"], manifest["input"]["std"])
    executor = compact(model)
    chunks = [(x[i : i + batch], labels[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]
    configs = budgets_of(model, budgets)
    times = {b: [] for b in configs}
    stats = {b: {"correct": 0, "ratio": 0.0, "macs": 0.0} for b in configs}
    for b in configs:  # warm-up, accuracy and cost
        for xb, yb in chunks:
            logits, info = executor(xb, budget=b, policy=policy, return_info=True)
            stats[b]["correct"] += int((logits.argmax(1) == yb).sum())
            stats[b]["ratio"] += float(model.budget_ratio(info.cost).sum())
            stats[b]["macs"] += float(info.cost.ratio.sum())
    for _ in range(repeat):
        for xb, _ in chunks:
            for b in configs:
                start = time.perf_counter()
                executor(xb, budget=b, policy=policy)
                times[b].append(time.perf_counter() - start)
    n = len(chunks) * batch
    rows = []
    for b in configs:
        ms = torch.tensor(times[b]).median().item() * 1e3
        rows.append({"model": manifest["name"], "architecture": manifest["architecture"],
                     "budget_unit": model.budget_unit, "policy": policy, "batch": batch, "budget": b,
                     "top1": round(stats[b]["correct"] / n, 4),
                     "budget_ratio": round(stats[b]["ratio"] / n, 4),
                     "mac_ratio": round(stats[b]["macs"] / n, 4), "ms_per_batch": round(ms, 3),
                     "ms_per_image": round(ms / batch, 3), "images": n})
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "batch", "budget", "top-1 %", "budget ratio (unit)", "MAC ratio", "ms/batch", "ms/image"],
        [[r["model"], r["batch"], r["budget"], f"{100 * r['top1']:.1f}",
          f"{r['budget_ratio']:.3f} ({r['budget_unit']})", f"{r['mac_ratio']:.3f}",
          f"{r['ms_per_batch']:.2f}", f"{r['ms_per_image']:.2f}"] for r in rows])


def plot(rows: list[dict], path: str) -> None:
    """Top-1 against measured ms per image, one panel per batch size, a line per model."""
    plot_by_batch(rows, path, "ms_per_image", "top1", "measured ms per image", "top-1 accuracy (%)", 100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the dataset (image folders or a training cache)")
    parser.add_argument("--models", nargs="+", required=True, help="checkpoint folders")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--images", type=int, default=256, help="test images (a seeded random N)")
    parser.add_argument("--policy", default="threshold", choices=POLICIES)
    parser.add_argument("--repeat", type=int, default=1, help="timed passes over the images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    pick = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(0))[: args.images]
    x, labels = data.test_x[pick], data.test_y[pick]  # the test split is ordered by class
    loadavg = os.getloadavg()
    rows = [row for batch in args.batch for folder in args.models
            for row in measure(folder, x, labels, args.budgets, batch, args.policy, args.repeat)]
    print(table(rows))
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "loadavg_before": loadavg,
            "images": len(labels), "data": str(args.data), "device": "cpu"}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
