"""Training recipes: optimizer, learning-rate schedule, weight averaging, precision.

`default`: SGD with Nesterov momentum, linear warmup then cosine decay, no weight decay on
1-d parameters (the long schedule the networks' papers use).

`fast` (`--recipe fast`): the fast CIFAR-10 recipe of the airbench / ResNet-9 line of work,
written here from its published description: batch 1024; learning rate and weight decay
given per 1024 examples and decoupled from the momentum (`decoupled`), BatchNorm shifts at
64x the learning rate; a triangular schedule (from 0.2 of the peak up to the peak at
`warmup` of the steps, then linearly to 0); label smoothing 0.2; lookahead weight averaging
every 5 steps; random translation by 2 pixels (reflected edges) and flips that alternate by
epoch. A network with a patch-whitening layer (FastNet) has it set from the training patches.
A preset only changes defaults: any option given on the command line wins.
"""

from __future__ import annotations

import math

import torch

from models.engines.precision import bf16_supported

from .config import TrainConfig

RECIPES = {
    "default": {},
    "fast": {"epochs": 16, "batch_size": 1024, "lr": 11.5, "momentum": 0.85, "weight_decay": 0.0153,
             "warmup": 0.2, "schedule": "triangle", "decoupled": True, "bias_lr_scale": 64.0,
             "label_smoothing": 0.2, "lookahead": True, "translate": 2, "reflect": True, "flip": "alternate",
             "grad_clip": 0.0},
}

LOOKAHEAD_EVERY = 5


def recipe_defaults(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return {"recipe": name, **RECIPES[name]}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the trainable parameters.

    Plain: no weight decay on 1-d parameters. Decoupled (`fast`): lr and weight decay are per
    1024 examples of a summed loss, scale = 1024 (1 + 1 / (1 - momentum)); for the mean loss
    used here SGD gets lr * batch / scale. The decay is decoupled from the learning rate: every
    step shrinks each weight by lr_sgd * wd_sgd = weight_decay * batch / scale, whatever its
    group's rate. BN shifts get `bias_lr_scale` times the learning rate (the same decay).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not cfg.decoupled:
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}],
                               lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    scale = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr, decay = cfg.lr * cfg.batch_size / scale, cfg.weight_decay * cfg.batch_size / scale
    shift_lr = lr * cfg.bias_lr_scale
    norms = {id(m.bias) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    shifts = [p for _, p in params if id(p) in norms]
    rest = [p for _, p in params if id(p) not in norms]
    return torch.optim.SGD([{"params": rest, "lr": lr, "weight_decay": decay / lr, "peak": lr},
                            {"params": shifts, "lr": shift_lr, "weight_decay": decay / shift_lr,
                             "peak": shift_lr}],
                           lr=lr, momentum=cfg.momentum, nesterov=True)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The schedule's multiplier of the peak learning rate at a step."""
    if cfg.schedule == "triangle":
        peak = max(1, round(cfg.warmup * total))
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return max(0.0, (total - step) / max(1, total - peak))
    warmup = max(1, round(cfg.warmup * total))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int) -> None:
    factor = lr_factor(cfg, step, total)
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak", cfg.lr) * factor


class Lookahead:
    """Lookahead weight averaging: every few steps the slow copy moves toward the weights
    (decay grows from 0 to 0.95^5 as (step / total)^3) and the weights jump to it; floating
    BN statistics are averaged too. `finish` leaves the weights at the slow copy."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        self.slow = {k: v.detach().clone() for k, v in self.tensors(model).items()}
        if state:
            for k, v in state.items():
                self.slow[k].copy_(v)

    @staticmethod
    def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, model: torch.nn.Module, step: int, total: int) -> None:
        if step % LOOKAHEAD_EVERY == 0:
            self.update(model, 0.95**LOOKAHEAD_EVERY * (step / total) ** 3)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in self.tensors(model).items():
            self.slow[key].lerp_(value, 1 - decay)
            value.copy_(self.slow[key])

    def finish(self, model: torch.nn.Module) -> None:
        self.update(model, 1.0)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast for `precision` bf16, or auto where the hardware supports it."""
    enabled = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled)
