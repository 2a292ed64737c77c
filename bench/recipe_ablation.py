"""The recipe ablation: what each change to the training recipe bought, from the checkpoints
the runs exported (their manifests, evaluations and model cards), one row per checkpoint:
the change, widths, epochs, the code's commit, test top-1 at budget 1.0, and the training
minutes and CPU the card records.

    python bench/recipe_ablation.py "old recipe=/tmp/old/weights/fastnet" \
        "weight decay fixed=weights/fastnet" "wide=weights/fastnet_wide" --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import fmt, markdown_table

from models.core.checkpoint import read_manifest


def card_minutes(folder: Path) -> tuple[float | None, str]:
    """Training minutes (every logged train command) and the hardware, from the model card."""
    card = folder / "README.md"
    row = re.search(r"^\| wall time \| (.*) \|$", card.read_text(), re.M) if card.is_file() else None
    if not row:
        return None, "not recorded"
    minutes = [float(m) for m in re.findall(r"train ([\d.]+) min", row.group(1))]
    hardware = re.search(r"\(([^()]*cores?[^()]*)\)", row.group(1))
    hardware = hardware.group(1).removeprefix("trained on ") if hardware else ""
    return (sum(minutes) if minutes else None), hardware


def row_for(label: str, folder: Path) -> dict:
    manifest = read_manifest(folder)
    train = manifest["provenance"]["train"]
    full = next(r for r in manifest["accuracy"] if r["budget"] == 1.0 and r["policy"] == "threshold")
    minutes, hardware = card_minutes(folder)
    return {"change": label, "model": folder.name, "widths": manifest["config"].get("widths"),
            "epochs": train["epochs"], "commit": manifest["provenance"].get("git_commit", "")[:7],
            "top1": round(100 * full["top1"], 2), "train_minutes": minutes, "hardware": hardware}


def markdown(rows: list[dict]) -> str:
    return markdown_table(
        ["change", "checkpoint", "widths", "epochs", "code", "test top-1 (%)", "train min", "CPU"],
        [[r["change"], f"`{r['model']}`", "/".join(map(str, r["widths"])) if r["widths"] else "-",
          r["epochs"], r["commit"], f"{r['top1']:.2f}", fmt(r["train_minutes"]), r["hardware"]]
         for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="LABEL=CHECKPOINT_FOLDER, in the table's order")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for item in args.rows:
        label, _, folder = item.rpartition("=")
        rows.append(row_for(label or Path(folder).name, Path(folder)))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
