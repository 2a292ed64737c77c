"""The training objective: one model for every budget.

Each step runs the batch in named passes (`sandwich_passes`), each at a budget and with its
own rules (`Pass`): `full` (budget 1.0) with cross-entropy on the labels, then `floor` and
`random` budgets distilled in place from the full pass's output (soft cross-entropy), as
slimmable networks do. Every pass adds a
compute-cost term, (mean executed-MAC ratio - effective budget)^2, that drives the threshold
policy's executed MACs toward the budget; the first pass adds the DGConv regularizer.

How the passes run:
- threshold policy with a linear training table, tau(b) = 1 - (b - floor) / (1 - floor); the
  cost term shapes the gate scores to fit it, and calibration replaces it after training;
- BatchNorm normalizes with batch statistics (and updates its running ones) in the full pass
  only, with its running statistics in the others, as in serving (`running_bn`): a channel
  skipped for the whole batch would otherwise have zero batch variance, and the
  straight-through gradient through it explodes. A slimmable network (not `adaptive`) is
  the exception: every width uses batch statistics, as US-Nets train (the sandwich rule),
  and `calibrate` re-estimates each width's statistics after training;
- the gates learn from the random budgets only: at the full budget and at the floor the masks
  (keep all, keep none) do not depend on the scores, and the straight-through gradient there
  would only push every score up, unopposed by the cost term (`gates_frozen`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.core.base import ForwardInfo, GatedNetwork
from models.core.budget import CalibrationTable


@dataclass(frozen=True)
class Pass:
    """One forward and backward of a training step: its kind, its budget and their rules."""

    kind: Literal["full", "floor", "random"]
    budget: float

    @property
    def teaches(self) -> bool:
        """Learns from the labels and regularizes; its output is the others' teacher."""
        return self.kind == "full"

    @property
    def gates_learn(self) -> bool:
        """Only random budgets train the gates: keep-all and keep-none masks ignore the scores."""
        return self.kind == "random"

    def batch_stats(self, model: GatedNetwork) -> bool:
        """BN normalizes with batch statistics (and updates its running ones): the full pass,
        and every pass of a network whose widths are not input-dependent (slimmable)."""
        return self.kind == "full" or not model.adaptive


def sandwich_passes(floor: float, random: int, generator: torch.Generator,
                    low: float | None = None) -> list[Pass]:
    """One step's passes: full first, the floor, then `random` budgets uniform in [low, 1].

    `low` defaults to the floor. An ungated (dense) network has the full pass only.
    """
    if floor >= 1.0:
        return [Pass("full", 1.0)]
    low = floor if low is None else max(low, floor)
    budgets = (low + (1 - low) * torch.rand(random, generator=generator)).tolist()
    return [Pass("full", 1.0), Pass("floor", floor), *(Pass("random", b) for b in budgets)]


def per_sample_budgets(batch: int, floor: float, full_fraction: float, generator: torch.Generator,
                       low: float | None = None) -> torch.Tensor:
    """(B,) budgets for a one-pass step: `full_fraction` of the images at 1.0, the rest
    uniform in [low, 1] (low defaults to the floor); all 1.0 for a dense network."""
    if floor >= 1.0:
        return torch.ones(batch)
    low = floor if low is None else max(low, floor)
    budgets = low + (1 - low) * torch.rand(batch, generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < full_fraction, 1.0, budgets)


def training_table(model: GatedNetwork) -> CalibrationTable:
    """tau(b) = 1 - (b - floor) / (1 - floor): the threshold the training passes use; a
    network whose cost does not depend on the input (slimmable) keeps its exact table."""
    totals = model.gated_totals()
    if not totals or not model.adaptive:
        return model.uniform_table()
    floor = model.floor()
    if floor >= 1.0:
        raise ValueError(f"the gates alone cost {floor:.2f} of the dense network; nothing to save")
    return CalibrationTable([floor, 1.0], [1.0, 0.0], [[0] * len(totals), totals], floor, "training")


@contextmanager
def gates_frozen(model: GatedNetwork):
    """Forward passes inside send no gradient into the gates (their scores are detached)."""
    handles = [m.register_forward_hook(lambda module, args, out: out.detach())
               for m in model.gate_modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def running_bn(model: torch.nn.Module):
    """BatchNorm layers normalize with their running statistics inside and leave them as they
    are, as in serving (the rest of the model stays in training mode)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


class CostModel:
    """Budget ratio per sample (`GatedNetwork.budget_ratio`: executed MACs, or BitOps for
    DFS), differentiable in the gates' straight-through masks.

    The value is exact (`ForwardInfo.cost`, from the hard masks); the gradient is that of a
    linearization: each kept channel of gated layer l costs its layer's marginal share per
    channel at the full network (its own convolutions, what later layers spend reading it,
    its gate's input).
    """

    def __init__(self, model: GatedNetwork) -> None:
        self.model = model
        totals = model.gated_totals()
        full = float(model.budget_ratio(model.count_cost(totals))[0])
        self.per_channel = []
        for layer, total in enumerate(totals):
            counts = list(totals)
            counts[layer] = 0
            saved = full - float(model.budget_ratio(model.count_cost(counts))[0])
            self.per_channel.append(saved / total)

    def ratio(self, info: ForwardInfo) -> torch.Tensor:
        exact = self.model.budget_ratio(info.cost).float()
        if not info.masks:
            return exact
        linear = sum(w * m.float().sum(1) for w, m in zip(self.per_channel, info.masks, strict=True))
        return exact.to(linear.device) + linear - linear.detach()


@dataclass
class Objective:
    """Loss of one budget pass: task term + cost term (+ DGConv regularizer)."""

    cost: CostModel
    cost_weight: float = 2.0
    dg_weight: float = 1e-3
    label_smoothing: float = 0.0
    per_sample: bool = False  # cost term per image, against its own budget (one-pass schedule)

    def __call__(self, model: GatedNetwork, logits: torch.Tensor, info: ForwardInfo,
                 labels: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
                 regularize: bool = False) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on `labels`, or soft cross-entropy on `teacher` probabilities."""
        logits = logits.float()
        if teacher is None:
            task = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        else:
            task = -(teacher * F.log_softmax(logits, 1)).sum(1).mean()
        ratio = self.cost.ratio(info)
        budgets = info.plan.effective.float().to(ratio.device)
        target = budgets.mean()
        loss = task
        if info.masks:
            if self.per_sample:
                excess = (ratio - budgets).square().mean()
            else:
                excess = (ratio.mean() - target).square()
            loss = loss + self.cost_weight * excess
        if regularize and self.dg_weight:
            loss = loss + self.dg_weight * model.regularizer().to(loss.device)
        return loss, {"task": task.detach(), "ratio": ratio.detach().mean(), "target": target}
