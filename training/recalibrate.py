"""Calibrate and evaluate an exported checkpoint again, in place: its budget table from the
calibration split its run held out of train, its accuracy rows (every policy) from the test
split, into its manifest, evaluation files and model card. For a checkpoint whose run folder is
gone, after a calibration fix or to add policies its card lacks."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.core.checkpoint import load_checkpoint, write_manifest

from .calibrate import calibrate
from .data import Dataset, holdout_split, subset
from .evaluate import ACCURACY_SECTION, card_section, evaluate, write_report


def recalibrate(directory: str | Path, data: Dataset, limit: int | None = None,
                test_limit: int | None = None, budgets: list[float] | None = None,
                policies: tuple[str, ...] = ("threshold", "topk", "cap"), step: float = 0.05,
                iterations: int = 5) -> dict:
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
    model.table = calibrate(model, data.train_x[held], mean, std, "cpu", step, iterations)
    test = subset(torch.arange(len(data.test_y)), test_limit, seed)
    result = evaluate(model, data.test_x[test], data.test_y[test], mean, std, "cpu", budgets, policies)
    manifest["calibration"] = model.table.to_dict()
    manifest["accuracy"] = result["rows"]
    manifest["provenance"]["calibration"] = {"source": model.table.source, "images": len(held)}
    manifest["provenance"]["evaluation"] = {"split": "test", "images": result["images"]}
    write_manifest(directory, manifest)
    write_report(result, directory, f"{manifest['name']} ({result['images']} test images)")
    card = directory / "README.md"
    if card.is_file():
        section = (f"{card_section(result)}\n\n(`acs-train recalibrate`: table refit on "
                   f"{len(held)} calibration images)\n")
        text = card.read_text()
        text = re.sub(rf"{re.escape(ACCURACY_SECTION)}.*?(?=\n## |\Z)", lambda _: section, text,
                      flags=re.S)
        card.write_text(text)
    return result
