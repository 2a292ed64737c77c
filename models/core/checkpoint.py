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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import GatedNetwork
from .budget import POLICIES, CalibrationTable
from .registry import build_model, describe

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
READABLE = 0o644  # checkpoint files: readable by the (non-root) serving user
REQUIRED = ("format_version", "name", "architecture", "config", "classes", "input",
            "calibration", "weights")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the file or folder, and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


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
                    default_budget: float = 1.0, default_policy: str = "threshold",
                    serve_default: bool = False, dense_baseline: str | None = None) -> Path:
    """Write model.safetensors and manifest.json into `directory`; returns the directory.
    `serve_default` marks the model the one a server answers /v1/predict with;
    `dense_baseline` names the dense model it is measured against."""
    architecture, config = describe(model)
    if len(classes) != config["num_classes"]:
        raise ValueError(f"{len(classes)} class names for a {config['num_classes']}-class model")
    if default_policy not in POLICIES:
        raise ValueError(f"unknown default policy {default_policy!r}")
    if not 0.0 <= default_budget <= 1.0:
        raise ValueError(f"default budget {default_budget} is not in [0, 1]")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS, metadata={"format": "acs-serve"})
    (directory / WEIGHTS).chmod(READABLE)  # safetensors writes 0600: a serving user must read it
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
        **({"serve_default": True} if serve_default else {}),
        **({"dense_baseline": dense_baseline} if dense_baseline else {}),
        "provenance": provenance or {},
        "weights": {"file": WEIGHTS, "sha256": sha256_file(directory / WEIGHTS)},
    }
    write_manifest(directory, manifest)
    return directory


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """A checkpoint's manifest.json (readable by the serving user)."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    path.chmod(READABLE)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint folder, checked for the required fields."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "no manifest") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read the manifest: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(path, "the manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(path, f"missing fields {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(path, f"format_version {manifest['format_version']} is not {FORMAT_VERSION}")
    weights = manifest["weights"]
    if not (isinstance(weights, dict) and isinstance(weights.get("file"), str)
            and isinstance(weights.get("sha256"), str) and Path(weights["file"]).name == weights["file"]):
        raise CheckpointError(path, 'weights must be {"file": "<a file in this folder>", "sha256": "..."}')
    if not isinstance(manifest["classes"], list) or not isinstance(manifest["config"], dict):
        raise CheckpointError(path, "classes must be a list and config an object")
    return manifest


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint (hash, config, classes, tensors); raises CheckpointError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(weights, "weights file missing")
    try:
        actual = sha256_file(weights)
    except OSError as e:
        raise CheckpointError(weights, f"cannot read the weights: {e.strerror}") from None
    if actual != manifest["weights"]["sha256"]:
        raise CheckpointError(weights, f"sha256 {actual} does not match the manifest's "
                              f"{manifest['weights']['sha256']} (file changed or corrupt)")
    try:
        model = build_model(manifest["architecture"], manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(directory, f"bad architecture or config: {e}") from None
    if len(manifest["classes"]) != model.config.num_classes:
        raise CheckpointError(directory, f"{len(manifest['classes'])} classes listed for a "
                              f"{model.config.num_classes}-class model")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(weights, f"not a readable safetensors file: {e}") from None
    try:
        model.load_state_dict(tensors, strict=True)
        model.table = CalibrationTable.from_dict(manifest["calibration"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(directory, f"weights or calibration do not fit the config: {e}") from None
    return Checkpoint(model.to(device).eval(), manifest, directory)
