"""Evaluation on the test split: top-1 and realized MACs (mean, p95, max) per budget and
policy, written as JSON, a Markdown table and an accuracy-vs-MACs plot (PNG).

The masked reference forward is measured (eval mode); the compact executor computes the
same logits and keep-masks (tests/models/test_contract.py), so the figures hold for serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from models.core.base import GatedNetwork
from models.core.budget import POLICIES
from models.engines.variants import VariantExecutor

from .data import normalize

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
PLOT = "accuracy_vs_macs.png"
ACCURACY_SECTION = "## Accuracy and executed MACs on the test split"  # in the model card


def default_budgets(model: GatedNetwork, step: float = 0.1) -> list[float]:
    """The floor, then step, 2*step, ... 1.0 above it (only 1.0 for a dense network)."""
    if not model.gated:
        return [1.0]
    floor = model.floor()
    grid = [round(i * step, 6) for i in range(1, round(1 / step) + 1)]
    return [round(floor, 4)] + [b for b in grid if b > floor + 1e-3]


@torch.no_grad()
def measure(model: GatedNetwork, images: torch.Tensor, labels: torch.Tensor, budget: float,
            policy: str, mean, std, device: torch.device | str = "cpu",
            batch_size: int = 500, runner=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct, budget ratio, executed-MAC ratio) per image, in eval mode, for uint8 images
    on any device, run by `runner` (default: the model's masked reference). The budget ratio
    is in the network's budget unit (MACs; BitOps for DFS)."""
    model.eval()
    runner = runner or model
    correct, ratio, macs = [], [], []
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        logits, info = runner(x, budget=budget, policy=policy, return_info=True)
        correct.append(logits.argmax(1).cpu() == labels[start : start + batch_size].cpu())
        ratio.append(model.budget_ratio(info.cost).cpu())
        macs.append(info.cost.ratio.cpu())
    return torch.cat(correct), torch.cat(ratio), torch.cat(macs)


def evaluate(model: GatedNetwork, images: torch.Tensor, labels: torch.Tensor, mean, std,
             device: torch.device | str = "cpu", budgets: list[float] | None = None,
             policies: tuple[str, ...] = POLICIES) -> dict:
    """Accuracy and realized MACs for every (policy, budget); a dense network: budget 1.0."""
    budgets = budgets or default_budgets(model)
    dense = model.count_cost([0] * len(model.gated_totals())).dense
    # a network of dense variants runs them sliced (torch, float32): what it computes, faster
    runner = VariantExecutor(model, "torch", device=device) if model.variants() is not None else model
    rows = []
    for policy in policies if model.gated else ("threshold",):
        for budget in budgets:
            correct, ratio, macs = measure(model, images, labels, budget, policy, mean, std, device,
                                           runner=runner)
            rows.append({
                "policy": policy, "budget": budget,
                "top1": round(correct.float().mean().item(), 4),
                "ratio_mean": round(ratio.mean().item(), 4),
                "ratio_p95": round(torch.quantile(ratio, 0.95).item(), 4),
                "ratio_max": round(ratio.max().item(), 4),
                "mmacs_mean": round(macs.mean().item() * dense / 1e6, 3),
                "mmacs_p95": round(torch.quantile(macs, 0.95).item() * dense / 1e6, 3),
                "mmacs_max": round(macs.max().item() * dense / 1e6, 3),
            })
    return {"images": len(labels), "dense_mmacs": round(dense / 1e6, 3), "budget_unit": model.budget_unit,
            "calibration": model.table.source, "rows": rows}


def markdown_table(result: dict) -> str:
    unit = "MACs" if result.get("budget_unit", "macs") == "macs" else "BitOps"
    lines = [f"| policy | budget | top-1 (%) | MACs mean (M) | {unit}/dense mean | p95 | max |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['policy']} | {r['budget']:.3g} | {100 * r['top1']:.2f} | "
                     f"{r['mmacs_mean']:.3g} | {r['ratio_mean']:.3f} | {r['ratio_p95']:.3f} | "
                     f"{r['ratio_max']:.3f} |")
    return "\n".join(lines) + "\n"


def card_section(result: dict) -> str:
    """The model card's accuracy section: the table and the plot."""
    return (f"{ACCURACY_SECTION} ({result['images']} images)\n\n{markdown_table(result)}\n"
            f"![accuracy vs MACs]({PLOT})")


def plot(result: dict, path: Path, title: str) -> None:
    """Top-1 against mean executed MACs, one line per policy."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for policy in dict.fromkeys(r["policy"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["policy"] == policy]
        ax.plot([r["mmacs_mean"] for r in rows], [100 * r["top1"] for r in rows], "o-", label=policy)
    ax.set_xlabel(f"executed MACs, mean per image (M; dense {result['dense_mmacs']:.1f} M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_report(result: dict, directory: Path, title: str) -> None:
    """eval.json, eval.md and accuracy_vs_macs.png in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (directory / EVAL_MD).write_text(markdown_table(result))
    plot(result, directory / PLOT, title)
