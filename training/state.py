"""A run directory: its config, its resumable checkpoint and its calibration.

runs/<name>/config.json              the training config (TrainConfig), written at the start
runs/<name>/checkpoint.safetensors   model and optimizer tensors, written after every epoch
                                     and every few minutes within one; its metadata holds the
                                     epoch, step, position in the epoch, history and the
                                     optimizer's scalars (one file, replaced atomically)
runs/<name>/calibration.json         the calibration table (`calibrate`)
runs/<name>/bn_stats.safetensors     state re-estimated by `calibrate` (slimmable: BN statistics)
runs/<name>/eval.json, eval.md, accuracy_vs_macs.png   (`evaluate`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.core.base import GatedNetwork
from models.core.budget import CalibrationTable
from models.core.checkpoint import MANIFEST, load_checkpoint
from models.core.registry import build_model

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CALIBRATION = "calibration.json"
CALIBRATED_STATE = "bn_stats.safetensors"  # the name older runs have
LOOKAHEAD = "lookahead"
RNG = "rng"  # the random generators' states of a checkpoint written within an epoch


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
               progress: dict, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write model and optimizer state, `progress` (epoch, step, history) and `extra` named
    groups of tensors (e.g. the lookahead weights) as one file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for group, values in (extra or {}).items():
        tensors.update({f"{group}.{k}": v.detach().cpu().contiguous() for k, v in values.items()})
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


def read_tensors(run: Path, group: str) -> dict[str, torch.Tensor]:
    """A named group of tensors saved with the checkpoint (`save_state`'s `extra`)."""
    prefix = group + "."
    return {k[len(prefix):]: v for k, v in load_file(run / CHECKPOINT).items() if k.startswith(prefix)}


def is_exported(folder: Path) -> bool:
    """A checkpoint folder written by `acs-train export` (weights/<name>), not a run folder."""
    return (folder / MANIFEST).is_file() and not (folder / CHECKPOINT).is_file()


def init_weights(model: torch.nn.Module, run: Path) -> list[str]:
    """Start a model from a trained run's weights, e.g. a gated network from its dense
    baseline (a run folder, or its exported checkpoint folder, which outlives run folders):
    every tensor of the source must fit the model; returns the model's tensors the source
    does not have (the gates), which keep their initialization."""
    if is_exported(run):
        source = load_checkpoint(run).model.state_dict()
    else:
        source = {k[6:]: v for k, v in load_file(run / CHECKPOINT).items() if k.startswith("model.")}
    own = model.state_dict()
    misfits = sorted(k for k, v in source.items() if k not in own or own[k].shape != v.shape)
    if misfits:
        raise ValueError(f"{run}: weights that do not fit this model: {misfits[:5]}")
    model.load_state_dict(source, strict=False)
    return sorted(set(own) - set(source))


def save_calibrated_state(run: Path, model: GatedNetwork) -> None:
    """Write what calibration re-estimated (`GatedNetwork.calibrated_state`) beside the weights."""
    save_tensors(run / CALIBRATED_STATE, model.calibrated_state())


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def log_command(run: Path, argv: list[str], seconds: float) -> None:
    """Append a command that worked on the run, its wall time and the hardware to its config
    (model cards list them: how to reproduce the run, and what it cost)."""
    config = read_config(run)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    config.setdefault("log", []).append({"command": " ".join(["acs-train", *argv]),
                                         "seconds": round(seconds, 1), "hardware": device})
    write_json(run / CONFIG, config)


def read_config(run: Path) -> dict:
    path = run / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a training run (no {CONFIG})")
    return json.loads(path.read_text())


def load_trained(run: Path, calibrated: bool = True) -> GatedNetwork:
    """The run's trained model (eval mode, CPU), with its calibration table and re-estimated
    BN statistics if there are any; or the model of an exported checkpoint folder."""
    if is_exported(run):
        return load_checkpoint(run).model.eval()
    config = read_config(run)
    model = build_model(config["architecture"], config["model"])
    load_state(run, model)
    if calibrated and (run / CALIBRATION).is_file():
        model.table = CalibrationTable.from_dict(json.loads((run / CALIBRATION).read_text()))
    if calibrated and (run / CALIBRATED_STATE).is_file():
        model.load_state_dict({**model.state_dict(), **load_file(run / CALIBRATED_STATE)})
    return model.eval()
