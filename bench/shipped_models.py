"""Every shipped model side by side: top-1 and mean executed MACs at budgets 1.0, 0.75, 0.5,
0.25 and the floor (from each model's evaluation on the test split, kept in its manifest),
the served executor's batch-1 and batch-32 latency at each budget, all measured here in one
run, in the dtype the server serves each model in (`dtype=auto` on this machine), and the
training time its card records; `--plot`: top-1 against mean executed MACs and against batch-1
latency, a line per model.

    OMP_NUM_THREADS=1 python bench/shipped_models.py --json docs/performance/shipped_models.json \
        --plot docs/performance/shipped_models.png
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch
from common import fmt, markdown_table
from skip_speed import SAMPLES, measure

from models.core.budget import POLICIES
from models.core.checkpoint import read_manifest
from models.engines.allocator import keep_freed_memory
from models.engines.precision import DTYPES, serving_dtype

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
BUDGETS = (1.0, 0.75, 0.5, 0.25)
FLOOR = 0.0  # the evaluation's name for the floor: every gated block skipped


def training_time(folder: Path) -> str:
    """The card's wall-time row (each logged command's minutes, and the hardware)."""
    card = folder / "README.md"
    found = re.search(r"^\| wall time \| (.*) \|$", card.read_text(), re.M) if card.is_file() else None
    return found.group(1) if found else "not recorded"


def accuracy(manifest: dict, policy: str) -> dict[float, dict]:
    """The manifest's evaluation rows of `policy`, by budget (FLOOR for the floor)."""
    return {round(r["budget"], 4): r for r in manifest["accuracy"] if r["policy"] == policy}


def rows_for(folder: Path, args) -> list[dict]:
    manifest = read_manifest(folder)
    served = serving_dtype("auto", torch.device(args.device), manifest)
    dtype = next(name for name, d in DTYPES.items() if d == served)
    timing = measure(argparse.Namespace(
        models=[str(folder)], dtypes=[dtype], budgets=list(BUDGETS), batch=[1, 32],
        policy=args.policy, images=str(SAMPLES), size=32, device=args.device,
        repeat=args.repeat, warmup=args.warmup, baseline=None))
    evaluated = accuracy(manifest, args.policy)
    rows = []
    for budget in sorted({r["budget"] for r in timing}, reverse=True):
        key = budget if budget in BUDGETS else FLOOR  # skip_speed adds the floor to gated ones
        ms = {r["batch"]: r["ms"] for r in timing if r["budget"] == budget}
        row = evaluated.get(key, {})
        rows.append({"model": folder.name, "dtype": dtype, "policy": args.policy,
                     "budget": "floor" if key == FLOOR else budget, "top1": row.get("top1"),
                     "mac_ratio": row.get("ratio_mean"), "mmacs": row.get("mmacs_mean"),
                     "batch1_ms": ms.get(1), "batch32_ms": ms.get(32), "training": training_time(folder)})
    return rows


def markdown(rows: list[dict]) -> str:
    cells, previous = [], None
    for r in rows:
        first = r["model"] != previous
        previous = r["model"]
        cells.append(["`" + r["model"] + "`" if first else "", r["dtype"] if first else "", r["budget"],
                      fmt(None if r["top1"] is None else 100 * r["top1"], ".2f"), fmt(r["mac_ratio"], ".3f"),
                      r["batch1_ms"], r["batch32_ms"], r["training"] if first else ""])
    return markdown_table(["model", "dtype", "budget", "top-1 (%)", "executed MACs", "batch 1 (ms)",
                           "batch 32 (ms)", "training"], cells)


def plot(rows: list[dict], path: str) -> None:
    """Top-1 against mean executed MACs (left) and batch-1 latency (right), a line per model."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=110)
    axes = fig.subplots(1, 2)
    colors = colormaps["tab20"].colors  # pairs of a dark and a light shade of one hue
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        pts = [r for r in rows if r["model"] == model and r["top1"] is not None]
        style = "o-" if len(pts) > 1 else "s"  # a dense model is one point
        for ax, x in zip(axes, ("mmacs", "batch1_ms"), strict=True):
            shade = colors[2 * (i % 10) + i // 10 % 2]  # the 10 dark shades first, then the light
            ax.plot([r[x] for r in pts], [100 * r["top1"] for r in pts], style, label=model, color=shade)
    for ax, label in zip(axes, ("executed MACs, mean per image (M)", "batch-1 latency, median (ms)"),
                         strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("top-1, test split (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Shipped models at budgets 0.25-1.0 and the floor ({rows[0]['policy']} policy)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(WEIGHTS), help="folder of checkpoint folders")
    p.add_argument("--policy", default="threshold", choices=POLICIES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the rows and the machine here")
    p.add_argument("--plot", help="write the top-1 / MACs / latency plot here (PNG)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    folders = sorted(f.parent for f in Path(args.weights).glob("*/manifest.json"))
    rows = [row for folder in folders for row in rows_for(folder, args)]
    print(markdown(rows))
    if args.json:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "threads": args.threads, "device": args.device}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
