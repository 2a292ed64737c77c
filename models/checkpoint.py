"""Checkpoints: safetensors weights plus a JSON manifest; no pickle anywhere.

weights/<name>/model.safetensors   the state dict
weights/<name>/manifest.json       architecture and config, classes, input size and
                                   normalization, calibration table, accuracy-vs-budget
                                   table, training provenance, sha256 of the weights
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import GatedNetwork
from .budget import POLICIES, CalibrationTable
from .registry import build_model, describe

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
REQUIRED = ("format_version", "name", "architecture", "config", "classes", "input",
            "calibration", "weights")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


@dataclass
class Checkpoint:
    model: GatedNetwork
    manifest: dict
    path: Path

    @property
    def name(self) -> str:
        return self.manifest["name"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model: GatedNetwork, directory: str | Path, *, name: str,
                    classes: list[str], mean=CIFAR_MEAN, std=CIFAR_STD,
                    accuracy: list[dict] | None = None, provenance: dict | None = None,
                    default_budget: float = 1.0, default_policy: str = "threshold") -> Path:
    """Write model.safetensors and manifest.json into `directory`; returns the directory."""
    architecture, config = describe(model)
    if len(classes) != config["num_classes"]:
        raise ValueError(f"{len(classes)} class names for a {config['num_classes']}-class model")
    if default_policy not in POLICIES:
        raise ValueError(f"unknown default policy {default_policy!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS, metadata={"format": "acs-serve"})
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "config": config,
        "classes": list(classes),
        "input": {"size": model.input_size, "mean": list(mean), "std": list(std)},
        "calibration": model.table.to_dict(),
        "accuracy": accuracy or [],
        "default": {"budget": default_budget, "policy": default_policy},
        "provenance": provenance or {},
        "weights": {"file": WEIGHTS, "sha256": sha256_file(directory / WEIGHTS)},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint folder, checked for the required fields."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: missing fields {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest['format_version']} "
                              f"is not {FORMAT_VERSION}")
    return manifest


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint (hash, config, classes, tensors); raises CheckpointError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing")
    actual = sha256_file(weights)
    if actual != manifest["weights"]["sha256"]:
        raise CheckpointError(f"{weights}: sha256 {actual} does not match the manifest's "
                              f"{manifest['weights']['sha256']} (file changed or corrupt)")
    try:
        model = build_model(manifest["architecture"], manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: bad architecture or config: {e}") from None
    if len(manifest["classes"]) != model.config.num_classes:
        raise CheckpointError(f"{directory}: {len(manifest['classes'])} classes listed for a "
                              f"{model.config.num_classes}-class model")
    try:
        model.load_state_dict(load_file(weights), strict=True)
        model.table = CalibrationTable.from_dict(manifest["calibration"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: weights or calibration do not fit the config: "
                              f"{e}") from None
    return Checkpoint(model.to(device).eval(), manifest, directory)
