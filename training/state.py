"""A run directory: its config, its resumable checkpoint and its calibration.

runs/<name>/config.json              the training config (TrainConfig), written at the start
runs/<name>/checkpoint.safetensors   model and optimizer tensors, written after every epoch;
                                     its metadata holds the epoch, step, history and the
                                     optimizer's scalars (one file, replaced atomically)
runs/<name>/calibration.json         the calibration table (`calibrate`)
runs/<name>/bn_stats.safetensors     BN statistics re-estimated by `calibrate` (slimmable)
runs/<name>/eval.json, eval.md, accuracy_vs_macs.png   (`evaluate`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.base import GatedNetwork
from models.budget import CalibrationTable
from models.registry import build_model

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CALIBRATION = "calibration.json"
BN_STATS = "bn_stats.safetensors"


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_state(run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               progress: dict) -> None:
    """Write model and optimizer state and `progress` (epoch, step, history) as one file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars = {}
    for index, state in optim["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"progress": json.dumps(progress), "param_groups": json.dumps(optim["param_groups"]),
                "optim_scalars": json.dumps(scalars)}
    save_tensors(run / CHECKPOINT, tensors, metadata)


def read_progress(run: Path) -> dict:
    with safe_open(run / CHECKPOINT, "pt") as f:
        return json.loads(f.metadata()["progress"])


def load_state(run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer) state from a run's checkpoint; returns its progress."""
    with safe_open(run / CHECKPOINT, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(run / CHECKPOINT)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in json.loads(metadata["optim_scalars"]).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return json.loads(metadata["progress"])


def save_bn_stats(run: Path, model: torch.nn.Module) -> None:
    """Write the model's BatchNorm statistics (running mean, variance, batch counts)."""
    stats = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    save_tensors(run / BN_STATS, stats)


def read_config(run: Path) -> dict:
    path = run / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no {CONFIG})")
    return json.loads(path.read_text())


def load_trained(run: Path, calibrated: bool = True) -> GatedNetwork:
    """The run's trained model (eval mode, CPU), with its calibration table and re-estimated
    BN statistics if there are any."""
    config = read_config(run)
    model = build_model(config["architecture"], config["model"])
    load_state(run, model)
    if calibrated and (run / CALIBRATION).is_file():
        model.table = CalibrationTable.from_dict(json.loads((run / CALIBRATION).read_text()))
    if calibrated and (run / BN_STATS).is_file():
        model.load_state_dict({**model.state_dict(), **load_file(run / BN_STATS)})
    return model.eval()
