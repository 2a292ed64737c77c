"""Calibrate and evaluate an exported checkpoint again, in place: its budget table from the
calibration split its run held out of train, its accuracy rows (every policy) from the test
split, into its manifest, evaluation files and model card. For a checkpoint whose run folder is
gone, after a calibration fix or to add policies its card lacks. `counts_only` keeps the
thresholds (and the threshold rows) and fits the topk/cap counts again: one pass over the
calibration images instead of a search, and the test split run under topk and cap only."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.core.checkpoint import load_checkpoint, write_manifest

from .calibrate import calibrate, refit_counts
from .data import Dataset, holdout_split, subset
from .evaluate import ACCURACY_SECTION, card_section, evaluate, write_report


def recalibrate(directory: str | Path, data: Dataset, limit: int | None = None,
                test_limit: int | None = None, budgets: list[float] | None = None,
                policies: tuple[str, ...] = ("threshold", "topk", "cap"), step: float = 0.05,
                iterations: int = 5, counts_only: bool = False) -> dict:
    """The checkpoint's new table and evaluation; `limit` / `test_limit` cap the calibration
    and test images (a random subset, seeded as the run was)."""
    directory = Path(directory)
    checkpoint = load_checkpoint(directory)
    model, manifest = checkpoint.model.eval(), checkpoint.manifest
    if not model.gated or not model.adaptive:
        raise ValueError(f"{directory}: only a network with input-dependent gates has a table to fit "
                         "(dense, width-level and slimmable networks: `acs-train calibrate --run`)")
    train = manifest["provenance"].get("train", {})
    seed = train.get("seed", 0)
    held = subset(holdout_split(data.train_y, train.get("calib_fraction", 0.1), seed)[1], limit, seed)
    mean, std = manifest["input"]["mean"], manifest["input"]["std"]
    test = subset(torch.arange(len(data.test_y)), test_limit, seed)
    kept_rows = []
    if counts_only:
        if len(test) != manifest["provenance"].get("evaluation", {}).get("images"):
            raise ValueError(f"{directory}: the threshold rows kept were measured on "
                             f"{manifest['provenance'].get('evaluation')}, not {len(test)} test images")
        model.table = refit_counts(model, data.train_x[held], mean, std, "cpu")
        kept_rows = [r for r in manifest["accuracy"] if r["policy"] == "threshold"]
        policies = tuple(p for p in policies if p != "threshold")
    else:
        model.table = calibrate(model, data.train_x[held], mean, std, "cpu", step, iterations)
    result = evaluate(model, data.test_x[test], data.test_y[test], mean, std, "cpu", budgets, policies)
    result["rows"] = kept_rows + result["rows"]
    manifest["calibration"] = model.table.to_dict()
    manifest["accuracy"] = result["rows"]
    manifest["provenance"]["calibration"] = {"source": model.table.source, "images": len(held)}
    manifest["provenance"]["evaluation"] = {"split": "test", "images": result["images"]}
    write_manifest(directory, manifest)
    write_report(result, directory, f"{manifest['name']} ({result['images']} test images)")
    card = directory / "README.md"
    if card.is_file():
        refit = "topk/cap counts refit, thresholds kept," if counts_only else "table refit"
        section = (f"{card_section(result)}\n\n(`acs-train recalibrate`: {refit} on {len(held)} "
                   "calibration images)\n")
        text = card.read_text()
        text = re.sub(rf"{re.escape(ACCURACY_SECTION)}.*?(?=\n## |\Z)", lambda _: section, text,
                      flags=re.S)
        card.write_text(text)
    return result
