"""`acs-train precision`: a checkpoint's top-1 when served in float32 and in bfloat16 (by the
executor the server runs: its variants in OpenVINO where installed, else the compact executor;
on the test split), recorded in its manifest and model card.
The server's `dtype=auto` serves bfloat16 only where this drop is within 0.1 point."""

from __future__ import annotations

import copy
import platform
import re
from pathlib import Path

import torch

from models.core.checkpoint import load_checkpoint, read_manifest, write_manifest
from models.engines.precision import BF16_TOLERANCE, DTYPES
from models.engines.variants import VariantExecutor, engine_name, executor_for

from .data import Dataset, normalize

BUDGETS = (1.0, 0.75, 0.5, 0.25)
SECTION = "## Serving precision"


@torch.no_grad()
def top1(executor, images: torch.Tensor, labels: torch.Tensor, data: Dataset, budget: float,
         policy: str, dtype: torch.dtype, batch_size: int = 500) -> float:
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start : start + batch_size], data.mean, data.std)
        if not isinstance(executor, VariantExecutor):  # variants take float32 images
            x = x.to(dtype)
        logits = executor(x, budget=budget, policy=policy)
        correct += (logits.float().argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def check_precision(directory: str | Path, data: Dataset, budgets=BUDGETS,
                    policies=("threshold",), limit: int | None = None) -> dict:
    """Top-1 in every serving dtype at each (policy, budget); written into the checkpoint's
    manifest (`dtypes.bfloat16`) and card. Returns what was written."""
    directory = Path(directory)
    model = load_checkpoint(directory).model
    images, labels = data.test_x[:limit], data.test_y[:limit]
    executors = {name: executor_for(copy.deepcopy(model), "cpu", dtype) for name, dtype in DTYPES.items()}
    engine = engine_name(executors["float32"])
    rows = []
    for policy in policies if model.gated else ("threshold",):
        for budget in budgets if model.gated else (1.0,):
            row = {"policy": policy, "budget": budget}
            for name, executor in executors.items():
                row[name] = round(top1(executor, images, labels, data, budget, policy, DTYPES[name]), 4)
            row["drop"] = round(row["float32"] - row["bfloat16"], 4)
            rows.append(row)
    result = {"images": len(labels), "top1_drop_max": max(r["drop"] for r in rows), "rows": rows,
              "engine": engine, "cpu": platform.processor() or platform.machine()}
    manifest = read_manifest(directory)
    manifest.setdefault("dtypes", {})["bfloat16"] = result
    write_manifest(directory, manifest)
    card = directory / "README.md"
    if card.is_file():
        text = re.sub(rf"\n{SECTION}\n.*?(?=\n## |\Z)", "", card.read_text(), flags=re.S)
        card.write_text(text.rstrip("\n") + "\n\n" + card_section(result))
    return result


def card_section(result: dict) -> str:
    holds = result["top1_drop_max"] <= BF16_TOLERANCE
    engine = {"openvino": "OpenVINO", "torch": "torch (variants)"}.get(result.get("engine"),
                                                                        "the compact executor")
    lines = [SECTION, "", f"Top-1 (%) served by {engine} in each dtype, test split "
             f"({result['images']} images), from `acs-train precision`. The largest drop is "
             f"{100 * result['top1_drop_max']:.2f} points"
             + (" (negative: bfloat16 scored higher everywhere)" if result["top1_drop_max"] < 0 else "")
             + (": `dtype=auto` serves bfloat16 where the hardware has it fast." if holds
                else ": more than 0.1 point, so `dtype=auto` serves float32."), "",
             "| policy | budget | float32 | bfloat16 | drop |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['policy']} | {r['budget']:g} | {100 * r['float32']:.2f} | {100 * r['bfloat16']:.2f} | "
              f"{100 * r['drop']:.2f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"
