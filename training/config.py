"""A training run's settings, its data splits and its freshly built model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.core import registry
from models.core.base import GatedNetwork

from .data import Dataset, holdout_split, load_dataset, subset
from .state import read_config

RESUMABLE = ("epochs", "device", "precision", "compile", "workers", "checkpoint_minutes")


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the run's config.json."""

    data: str
    run: str
    arch: str = "acs_densenet40"
    model_config: dict = field(default_factory=dict)
    dataset_name: str | None = None
    cache: str | None = None
    image_size: int = 32
    workers: int | None = None
    calib_fraction: float = 0.1
    limit: int | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.02
    grad_clip: float = 5.0
    random_budgets: int = 2
    min_budget: float | None = None
    cost_weight: float = 2.0
    dg_weight: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    recipe: str = "default"
    schedule: str = "cosine"
    decoupled: bool = False
    bias_lr_scale: float = 1.0
    label_smoothing: float = 0.0
    lookahead: bool = False
    translate: int = 4
    reflect: bool = False
    flip: str = "random"
    init_from: str | None = None
    teacher: str | None = None
    budget_schedule: str = "sandwich"
    full_fraction: float = 0.25
    freeze_bn: bool = False
    checkpoint_minutes: float = 10.0

    def __post_init__(self) -> None:
        choices = {"precision": ("auto", "bf16", "fp32"), "schedule": ("cosine", "triangle"),
                   "flip": ("random", "alternate"), "budget_schedule": ("sandwich", "per-sample")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")


@dataclass
class Splits:
    """The dataset and a run's indices: train and calibration (into train_x), test."""

    data: Dataset
    train: torch.Tensor
    calibration: torch.Tensor
    test: torch.Tensor


def load_splits(cfg: TrainConfig) -> Splits:
    """The dataset and the run's splits; `limit` caps each at that many random images."""
    data = load_dataset(cfg.data, cfg.cache, cfg.image_size, cfg.workers)
    train, calibration = holdout_split(data.train_y, cfg.calib_fraction, cfg.seed)
    return Splits(data, subset(train, cfg.limit, cfg.seed), subset(calibration, cfg.limit, cfg.seed),
                  subset(torch.arange(len(data.test_y)), cfg.limit, cfg.seed))


def new_model(cfg: TrainConfig, num_classes: int, image_size: int) -> GatedNetwork:
    """A new network of the run's --arch name (`registry.create_model`) and --config overrides."""
    return registry.create_model(cfg.arch, num_classes=num_classes,
                                 **{"input_size": image_size, **cfg.model_config})


def run_config(directory: str | Path, **overrides) -> TrainConfig:
    """A run's stored config, with settings (e.g. limit, device) replaced for this command."""
    return TrainConfig(**{**read_config(Path(directory))["train"], **overrides})


def resume_config(run: str | Path, overrides: dict) -> TrainConfig:
    """A run's stored config; only RESUMABLE settings may be changed when resuming."""
    stored = read_config(Path(run))["train"]
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE and v != stored.get(k))
    if changed:
        raise ValueError(f"cannot change {changed} when resuming {run} (only {list(RESUMABLE)})")
    return run_config(run, **overrides)
