"""Budget policies: turn a per-request compute budget into per-layer channel masks.

`budget` in [0, 1] is the fraction of the dense network's MACs a request may use (gates
included). Below the network's floor it is clamped to the floor.

- threshold: keep channels whose score >= tau(b); input-adaptive, tracks b on average.
- topk: keep the best counts_l(b) channels of each layer; the same cost for every request.
- cap: threshold, but never more than topk keeps per layer (and group), so no request
  costs more than b; the best scores are kept first.

`PrefixPlan` keeps prefixes instead (slimmable widths, DFS's precision levels): the policy
decides how many entries a layer keeps, the order which ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

GRID_STEP = 0.05  # budget spacing of data-free tables
POLICIES = ("threshold", "topk", "cap")
TAU_CLOSED = 1.5  # a threshold above every gate score (scores are in [0, 1]): every gate
# closed. The floor's threshold: at 1.0, gates that saturate at a score of exactly 1.0 open.


def uniform_tau(ratio: float) -> float:
    """A data-free table's threshold for keeping `ratio` of the channels: 1 - ratio, and
    TAU_CLOSED for none."""
    return 1.0 - ratio if ratio > 0 else TAU_CLOSED


@dataclass
class CalibrationTable:
    """budget -> (tau, per-layer kept counts); monotone; stored with the weights."""

    budgets: list[float]
    taus: list[float]
    counts: list[list[int]]
    floor: float
    source: str = "uniform"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        n = len(self.budgets)
        if n == 0 or len(self.taus) != n or len(self.counts) != n:
            raise ValueError("calibration table: budgets, taus and counts must have one entry each")
        if any(b2 <= b1 for b1, b2 in zip(self.budgets, self.budgets[1:], strict=False)):
            raise ValueError("calibration table: budgets must be strictly increasing")
        if any(t2 > t1 for t1, t2 in zip(self.taus, self.taus[1:], strict=False)):
            raise ValueError("calibration table: tau must not increase with the budget")
        for c1, c2 in zip(self.counts, self.counts[1:], strict=False):
            if len(c1) != len(c2) or any(b < a for a, b in zip(c1, c2, strict=True)):
                raise ValueError("calibration table: counts must not decrease with the budget")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"calibration table: floor {self.floor} is not in (0, 1]")

    def clamp(self, budget: torch.Tensor) -> torch.Tensor:
        """Effective budget: the request's budget clamped to [floor, 1]."""
        return budget.clamp(min=self.floor, max=1.0)

    def _tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(budgets, counts) as tensors on a device, built once per device."""
        cache = self.__dict__.setdefault("_cache", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.budgets, dtype=torch.float64, device=device),
                             torch.tensor(self.counts, dtype=torch.long, device=device))
        return cache[device]

    def tau(self, budget: torch.Tensor) -> torch.Tensor:
        """Threshold for each (effective) budget, interpolated linearly between grid points
        (clamped to the grid's ends)."""
        taus = np.interp(budget.double().cpu().numpy(), self.budgets, self.taus)
        return torch.from_numpy(taus).float().to(budget.device)

    def layer_counts(self, budget: torch.Tensor) -> torch.Tensor:
        """Per-layer counts (B, L) of the largest grid budget <= each budget (cost <= b).

        The tolerance absorbs float32 rounding (0.7 arrives as 0.69999999)."""
        grid, counts = self._tensors(budget.device)
        rows = (torch.searchsorted(grid, budget.double() + 1e-6, right=True) - 1).clamp(min=0)
        return counts[rows]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationTable:
        return cls(**data)


def as_budget(budget: float | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """A (B,) float tensor of budgets from a float, a tensor of one or B values, or None (1.0)."""
    if budget is None:
        budget = 1.0
    b = torch.as_tensor(budget, dtype=torch.float32, device=device).flatten()
    if b.numel() == 1:
        b = b.expand(batch)
    if b.numel() != batch:
        raise ValueError(f"got {b.numel()} budgets for a batch of {batch}")
    if not ((b >= 0) & (b <= 1)).all():  # NaN fails both
        raise ValueError("budget must be a finite number in [0, 1]")
    return b


@dataclass
class BudgetPlan:
    """One forward call's resolved budgets: what every gated layer should keep."""

    policy: str
    requested: torch.Tensor
    effective: torch.Tensor
    tau: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def resolve(cls, table: CalibrationTable, budget, policy: str, batch: int,
                device: torch.device, **extra) -> BudgetPlan:
        """The plan of a call; `extra`: a subclass's own fields."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {list(POLICIES)}")
        requested = as_budget(budget, batch, device)
        effective = table.clamp(requested)
        return cls(policy, requested, effective, table.tau(effective),
                   table.layer_counts(effective), **extra)

    def select(self, layer: int, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Boolean keep-mask (B, C) for gated layer `layer` from its gate scores (B, C)."""
        if self.policy == "threshold":
            return scores >= self.tau[:, None]
        batch, channels = scores.shape
        grouped = scores.reshape(batch, groups, channels // groups)
        per_group = self.counts[:, layer] // groups
        if batch == 1 or (per_group == per_group[0]).all():
            best = grouped.topk(int(per_group[0]), -1).indices
            keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, best, True)
            keep = keep.reshape(batch, channels)
        else:
            ranks = grouped.argsort(-1, descending=True).argsort(-1)
            keep = (ranks < per_group[:, None, None]).reshape(batch, channels)
        if self.policy == "cap":
            keep &= scores >= self.tau[:, None]
        return keep

    def rows(self, index: torch.Tensor) -> BudgetPlan:
        """The plan for a subset of the batch (every per-sample tensor field indexed)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def budget_grid(floor: float, step: float = GRID_STEP) -> list[float]:
    """A table's budgets: the floor, then step, 2 step, ... 1.0 as float32 values (requests
    arrive as float32, and a table's per-layer counts are looked up by comparison with its
    budgets)."""
    grid = torch.tensor([i * step for i in range(1, round(1 / step) + 1)], dtype=torch.float32)
    return [floor] + [b for b in grid.double().tolist() if b > floor + 1e-6]


def largest_within(cost: Callable[[int], float], n: int, budget: float) -> int:
    """The largest i < n with cost(i) <= budget, for a cost non-decreasing in i (cost(0) is
    taken to fit: the floor)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget + 1e-9 else (lo, mid - 1)
    return lo


def uniform_counts(totals: list[int], groups: list[int], ratio: float) -> list[int]:
    """Keep `ratio` of each layer's channels, rounded down to a multiple of its groups."""
    return [int(math.floor(ratio * t / g + 1e-9)) * g for t, g in zip(totals, groups, strict=True)]


def prefix_mask(counts: torch.Tensor, total: int) -> torch.Tensor:
    """(B, total) bool masks keeping the first counts[b] entries of each row."""
    return torch.arange(total, device=counts.device)[None] < counts[:, None]


@dataclass
class PrefixPlan(BudgetPlan):
    """A budget plan whose masks are prefixes: as many leading entries as the policy keeps.

    With scores that do not increase along a layer (DFS's thermometer scores) this is what
    the policy selects anyway; it also settles ties, so masks are always prefixes.
    """

    def select(self, layer: int, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        keep = super().select(layer, scores, groups)
        return prefix_mask(keep.sum(1), scores.shape[1])
