"""What every gated network shares: the walks over its units (reference, cost), per-call budgets,
the calibration table, the data-free table."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .budget import (
    GRID_STEP,
    BudgetPlan,
    CalibrationTable,
    budget_grid,
    largest_within,
    uniform_counts,
    uniform_tau,
)
from .macs import Cost
from .units import Tally, Trace, Unit


@dataclass
class ForwardInfo:
    """What a forward call decided and what it cost."""

    plan: BudgetPlan
    masks: list[torch.Tensor]  # per gated layer, (B, C_l); float with STE gradients in training
    scores: list[torch.Tensor]  # per gated layer, (B, C_l) gate scores
    cost: Cost


def masks_from_counts(counts: list[int], totals: list[int], groups: list[int]) -> list[torch.Tensor]:
    """One sample's masks keeping the first count/groups channels of every group."""
    masks = []
    for count, total, g in zip(counts, totals, groups, strict=True):
        size = total // g
        keep = torch.arange(size) < count // g
        masks.append(keep.repeat(g)[None])
    return masks


class Gate(nn.Module):
    """Base of the modules whose outputs are gate scores (training can detach them)."""


class DenseForward(nn.Module):
    """A network's forward at budget 1.0 as a plain module (normalized images -> logits): a
    dense network's one variant, which a runtime compiles whole."""

    def __init__(self, network: GatedNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, budget=1.0)


class GatedNetwork(nn.Module):
    """Base of the gated networks; `budget` is a per-call argument, never module state.

    `budget_unit`: what a budget is a fraction of (dense MACs, unless a network says
    otherwise, as DFS does with BitOps); `adaptive`: whether the cost at a budget depends on
    the input (it does not for slimmable widths: nothing to calibrate on data).
    """

    architecture: str  # the name a manifest stores
    config_class: type  # its config dataclass (with `to_dict`)
    tally_class: type = Tally  # the cost walk's sums (a method with more figures subclasses it)
    input_size: int = 32
    budget_unit: str = "macs"
    adaptive: bool = True

    def units(self) -> list[Unit]:
        """The network, described once: its units in execution order (core/units.py)."""
        raise NotImplementedError

    def variants(self) -> list[nn.Module] | None:
        """Dense eval-mode modules (normalized images -> logits) that compute this network, for
        a runtime to compile (`models.engines.variants`); None: the compact executor runs it."""
        return None

    # Training hooks: `training/` calls these and knows no network by name.
    def prepare(self, images: torch.Tensor) -> None:
        """Before a fresh run's first step: set what the network derives from data (normalized
        training images, (N, 3, H, W)); by default nothing."""

    def order_channels(self) -> None:
        """Reorder channels after loading dense weights, so that prefixes keep the important
        ones (a network whose budget keeps prefixes); by default nothing."""

    def recalibrate(self, batches: Iterable[torch.Tensor]) -> int:
        """After training, at calibration: re-estimate what training left stale from normalized
        image batches; returns the batches read (by default none: nothing is stale)."""
        return 0

    def calibrated_state(self) -> dict[str, torch.Tensor]:
        """The tensors `recalibrate` sets, which a run saves beside its weights (default none)."""
        return {}

    def gated_totals(self) -> list[int]:
        """Channels of each gated layer, in execution order."""
        return [c for unit in self.units() for c, _ in unit.gated_layers()]

    def gated_groups(self) -> list[int]:
        """Channel groups of each gated layer (kept counts are per group)."""
        return [g for unit in self.units() for _, g in unit.gated_layers()]

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1,
             **extra) -> Cost:
        """Cost of running the given per-layer keep-masks (B, C_l) on a height x width input
        (the units' cost walk). No masks: every channel kept, `batch` samples; `extra`: a
        method's per-call data (see `run_extra`)."""
        if not masks:
            masks = [torch.ones(batch, t, dtype=torch.bool) for t in self.gated_totals()]
        tally = self.tally_class(masks, height, width, batch, extra)
        for unit in self.units():
            unit.cost(tally)
        return tally.cost([m.shape[1] for m in masks])

    def budget_ratio(self, cost: Cost) -> torch.Tensor:
        """The per-sample figure a budget bounds, in `budget_unit`: the executed-MAC ratio."""
        return cost.ratio

    def gate_modules(self) -> list[nn.Module]:
        """The modules whose outputs are gate scores (training can detach them)."""
        return [m for m in self.modules() if isinstance(m, Gate)]

    def run(self, x: torch.Tensor, plan: BudgetPlan) -> tuple[torch.Tensor, list, list]:
        """Masked reference execution: (logits, masks, scores)."""
        return self.run_extra(x, plan)[:3]

    def run_extra(self, x: torch.Tensor, plan: BudgetPlan) -> tuple[torch.Tensor, list, list, dict]:
        """`run` (the units' reference walk), plus the method-specific data of this call that
        `macs` takes as keyword arguments (what units `Trace.add`: channel gating's open
        pixels)."""
        trace = Trace(plan, self.straight_through)
        state = {"x": x}
        for unit in self.units():
            state = unit.reference(state, trace)
        return state["logits"], trace.masks, trace.scores, trace.extra

    def compact_state(self, x: torch.Tensor, plan: BudgetPlan) -> dict:
        """The state the first compact step reads; a method adds its per-call data here
        (channel gating: tau, the policy, a record of open pixels)."""
        return {"x": x}

    def compact_extra(self, state: dict) -> dict:
        """`macs` keyword arguments from the compact call's initial state after the call (the
        compact counterpart of `run_extra`'s data). None by default."""
        return {}

    def straight_through(self, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """A hard keep-mask in the scores' dtype; in training, with the scores' gradient
        (straight-through: the decision forward, the gate's gradient backward)."""
        hard = hard.to(scores.dtype)
        return hard + scores - scores.detach() if self.training else hard

    @property
    def min_input_size(self) -> int:
        """Smallest input height and width the network runs at."""
        return 1

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than this network's "
                             f"minimum {self.min_input_size}x{self.min_input_size}")

    @property
    def gated(self) -> bool:
        return bool(self.gated_totals())

    @property
    def table(self) -> CalibrationTable:
        if getattr(self, "_table", None) is None:
            self._table = self.uniform_table()
        return self._table

    @table.setter
    def table(self, table: CalibrationTable) -> None:
        totals = len(self.gated_totals())
        if any(len(c) != totals for c in table.counts):
            raise ValueError(f"calibration table has counts for the wrong number of layers "
                             f"(network has {totals} gated layers)")
        self._table = table

    def plan(self, budget, policy: str, batch: int, device) -> BudgetPlan:
        return BudgetPlan.resolve(self.table, budget, policy, batch, device)

    def forward(self, x: torch.Tensor, budget: float | torch.Tensor | None = None,
                policy: str = "threshold", return_info: bool = False):
        """Logits for x at the given budget(s); with return_info, also masks and cost."""
        self.check_input(x)
        plan = self.plan(budget, policy, x.shape[0], x.device)
        logits, masks, scores, extra = self.run_extra(x, plan)
        if not return_info:
            return logits
        hard = [(m.detach() > 0) for m in masks]
        cost = self.macs(hard, *x.shape[-2:], batch=x.shape[0], **extra)
        return logits, ForwardInfo(plan, masks, scores, cost)

    def count_cost(self, counts: list[int], height: int | None = None,
                   width: int | None = None) -> Cost:
        """Cost of one sample keeping `counts` channels per gated layer."""
        h = height or self.input_size
        w = width or self.input_size
        return self.macs(masks_from_counts(counts, self.gated_totals(), self.gated_groups()), h, w)

    def floor(self) -> float:
        """Executed-MAC ratio with every gated channel skipped, at the native input size."""
        return float(self.count_cost([0] * len(self.gated_totals())).ratio[0])

    def uniform_table(self, step: float = GRID_STEP) -> CalibrationTable:
        """A data-free table: every layer keeps the same fraction r(b); tau(b) = 1 - r(b)
        (TAU_CLOSED where r(b) is 0)."""
        totals, groups = self.gated_totals(), self.gated_groups()
        if not totals:
            return CalibrationTable([1.0], [0.0], [[]], 1.0, "dense")
        floor = self.floor()

        # Uniform counts change only at these ratios; the cost grows with the ratio.
        ratios = sorted({c * g / t for t, g in zip(totals, groups, strict=True)
                         for c in range(t // g + 1)})

        @functools.cache
        def cost(i: int) -> float:
            return float(self.count_cost(uniform_counts(totals, groups, ratios[i])).ratio[0])

        budgets = budget_grid(floor, step)
        best = [ratios[largest_within(cost, len(ratios), b)] for b in budgets]
        counts = [uniform_counts(totals, groups, r) for r in best]
        return CalibrationTable(budgets, [uniform_tau(r) for r in best], counts, floor, "uniform")

    def regularizer(self) -> torch.Tensor:
        """Sum of the `penalty()` of every submodule that has one (DGConv's learned grouping);
        0 when there are none."""
        terms = [m.penalty() for m in self.modules() if m is not self and hasattr(m, "penalty")]
        return torch.stack(terms).sum() if terms else torch.zeros(())
