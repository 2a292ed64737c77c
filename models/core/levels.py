"""Width levels: networks that run as a few dense sub-networks, each a prefix of every layer.

A `LevelNetwork` runs every image at one of its width levels (`level_counts`: the channels
every gated layer keeps, a prefix). Each level is a dense network of contiguous weight
slices (`variant(level)`), which an engine (`models.engines.variants`) compiles once. The budget
routes each image (`routes`):

- `topk`: the widest level whose MAC ratio is <= the budget (every image the same);
- `threshold`: a confidence cascade. The image first runs a probe level; when the probe's
  top-1 probability leaves an uncertainty (1 - p) below tau it stops there, else it runs a
  wider target level too. The probe's MACs count as gate MACs of an escalated image. The
  table's `extra["cascade"]["threshold"]` holds (budget, probe, target, tau) rows,
  calibrated on held-out images so that the mean cost tracks the budget (`fit_cascade`);
- `cap`: the same, from `extra["cascade"]["cap"]`, whose rows only pair levels whose costs
  add up to at most the budget: no image costs more.

A request runs the row at or below its budget; without calibrated rows every policy runs
as topk.

`cascade` runs the routes with any `run(level, images)`: the masked reference, the torch
variants or a compiled runtime, so every engine decides the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .base import GatedNetwork
from .budget import BudgetPlan, CalibrationTable, prefix_mask
from .macs import Cost

NEVER = float("inf")  # a tau no uncertainty reaches: never escalate


def check_levels(name: str, levels: tuple[float, ...]) -> None:
    """Width levels must increase from above 0 to exactly 1.0 (a config's check)."""
    if (not levels or levels[0] <= 0 or levels[-1] != 1.0
            or any(b <= a for a, b in zip(levels, levels[1:], strict=False))):
        raise ValueError(f"{name} {levels} must increase from above 0 to exactly 1.0")


@dataclass
class WidthPlan(BudgetPlan):
    """A budget plan keeping the prefix of counts(b) channels of every layer (at least
    `minimum`, the narrowest width), whatever the scores."""

    minimum: tuple[int, ...] = ()

    def select(self, layer: int, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        count = self.counts[:, layer]
        if self.minimum:
            count = count.clamp(min=self.minimum[layer])
        return prefix_mask(count, scores.shape[1])


def width_table(network: GatedNetwork, rows: list[list[int]], widths: list[float]) -> CalibrationTable:
    """The exact data-free table of width levels (per-layer counts `rows`, narrowest first):
    one row per level, budget = its MAC ratio; a level no costlier than the one before it
    (tiny layers) is left out."""
    budgets, taus, counts, kept = [], [], [], []
    for row, width in zip(rows, widths, strict=True):
        cost = float(network.budget_ratio(network.count_cost(row))[0])
        if budgets and (cost <= budgets[-1] or row == counts[-1]):
            continue
        budgets.append(cost)
        taus.append(round(1.0 - width, 6))
        counts.append(row)
        kept.append(width)
    return CalibrationTable(budgets, taus, counts, budgets[0], "widths",
                            {"widths": kept, "method": "widest width level whose MAC ratio is "
                             "<= the budget; exact, input-independent"})


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """1 - top-1 probability, per image: what the cascade escalates on."""
    return 1 - logits.float().softmax(1).amax(1)


def cascade(run, x: torch.Tensor, probe: torch.Tensor, target: torch.Tensor, tau: torch.Tensor):
    """Run routes: each image at its probe level, then the uncertain ones (uncertainty >=
    tau, target wider than probe) at their target level. `run(level, images)` -> logits.
    Returns (logits, final level (B,), escalated (B,) bool); images sharing a level run as
    one batch."""
    if x.shape[0] == 1:  # one image: no grouping, as few tensor operations as can be
        p, t = int(probe[0]), int(target[0])
        logits = run(p, x)
        if t > p and float(uncertainty(logits)[0]) >= float(tau[0]):
            return run(t, x), target, torch.ones(1, dtype=torch.bool, device=probe.device)
        return logits, probe, torch.zeros(1, dtype=torch.bool, device=probe.device)
    if bool((probe == probe[0]).all()):  # one probe level (a single budget): no split
        logits = run(int(probe[0]), x)
    else:
        logits = None
        for level in probe.unique().tolist():
            rows = (probe == level).nonzero().flatten()
            out = run(level, x[rows])
            if logits is None:
                logits = out.new_empty(x.shape[0], *out.shape[1:])
            logits[rows] = out
    wider = target > probe
    if not bool(wider.any()):
        return logits, probe, wider
    escalated = wider & (uncertainty(logits) >= tau.to(logits.device))
    final = torch.where(escalated, target, probe)
    for level in target[escalated].unique().tolist():
        rows = (escalated & (target == level)).nonzero().flatten()
        logits[rows] = run(level, x[rows]).to(logits.dtype)
    return logits, final, escalated


class LevelNetwork(GatedNetwork):
    """A gated network whose masks are width levels (see the module docstring). A network
    says its levels' counts (`level_counts`, one entry per gated layer) and builds a level's
    dense module (`variant`)."""

    adaptive = False  # each level's cost is exact; calibration fits the cascade only

    def level_counts(self, level: int) -> list[int]:
        raise NotImplementedError

    def variant(self, level: int) -> nn.Module:
        """Level `level` as a dense eval-mode module: normalized images -> logits."""
        raise NotImplementedError

    @property
    def num_levels(self) -> int:
        return len(self.config.levels)

    def variants(self) -> list[nn.Module]:
        """One dense module per level, narrowest first."""
        return [self.variant(level) for level in range(self.num_levels)]

    def uniform_table(self, step: float | None = None) -> CalibrationTable:
        """The exact table: one row per width level; `step` unused."""
        return width_table(self, [self.level_counts(i) for i in range(self.num_levels)],
                           list(self.config.levels))

    def floor(self) -> float:
        return float(self.budget_ratio(self.count_cost(self.level_counts(0)))[0])

    def plan(self, budget, policy: str, batch: int, device) -> WidthPlan:
        return WidthPlan.resolve(self.table, budget, policy, batch, device,
                                 minimum=tuple(self.level_counts(0)))

    def level_costs(self, height: int, width: int) -> tuple[list[int], list[float]]:
        """Executed MACs and budget ratios of every level at an input size (computed once)."""
        cache = self.__dict__.setdefault("_level_costs", {})
        if (height, width) not in cache:
            costs = [self.count_cost(self.level_counts(i), height, width) for i in range(self.num_levels)]
            cache[height, width] = ([int(c.executed[0]) for c in costs],
                                    [float(self.budget_ratio(c)[0]) for c in costs])
        return cache[height, width]

    def widest_within(self, budget: torch.Tensor, spent: torch.Tensor | float = 0.0) -> torch.Tensor:
        """(B,) the widest level whose ratio plus `spent` is <= budget (-1: none)."""
        ratios = torch.tensor(self.level_costs(self.input_size, self.input_size)[1], dtype=torch.float64)
        spent = torch.as_tensor(spent, dtype=torch.float64)[..., None]
        fits = ratios[None] + spent <= budget.double().cpu()[:, None] + 1e-6
        return torch.where(fits.any(1), fits.int().cumsum(1).argmax(1), -1).to(budget.device)

    def routes(self, plan: BudgetPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probe level, target level, tau), per image, for a plan (see the module docstring)."""
        b = plan.effective
        if b.shape[0] == 1 or bool((b == b[0]).all()):  # one budget (the common case): cached
            probe, target, tau = self.route_of(plan.policy, float(b[0]))
            return (torch.full_like(b, probe, dtype=torch.long), torch.full_like(b, target, dtype=torch.long),
                    torch.full_like(b, tau))
        picked = torch.tensor([self.route_of(plan.policy, v) for v in b.tolist()], dtype=torch.float64)
        picked = picked.to(b.device)
        return picked[:, 0].long(), picked[:, 1].long(), picked[:, 2].float()

    def route_of(self, policy: str, budget: float) -> tuple[int, int, float]:
        """(probe, target, tau) of one effective budget under a policy: the table's cascade row
        at or below it, else the widest level within it (topk)."""
        key = (policy, budget)
        cache = self.table.__dict__.setdefault("_routes", {})  # dropped with its table
        if key not in cache:
            rows = self.table.extra.get("cascade", {}).get(policy)
            if rows:
                row = max([r for r in rows if r[0] <= budget + 1e-6] or rows[:1], key=lambda r: r[0])
                cache[key] = (int(row[1]), int(row[2]), float(row[3]))
            else:
                level = max(int(self.widest_within(torch.tensor([budget]))[0]), 0)
                cache[key] = (level, level, NEVER)
        return cache[key]

    def level_plan(self, plan: BudgetPlan, levels: torch.Tensor) -> BudgetPlan:
        """The plan with every image's counts those of its level."""
        return replace(plan, counts=self.levels_counts(levels.device)[levels])

    def levels_counts(self, device) -> torch.Tensor:
        """(levels, gated layers) counts of every level, built once per device."""
        cache = self.__dict__.setdefault("_levels_counts", {})
        if device not in cache:
            cache[device] = torch.tensor([self.level_counts(i) for i in range(self.num_levels)],
                                         device=device)
        return cache[device]

    def route(self, x: torch.Tensor, plan: BudgetPlan) -> tuple[BudgetPlan, torch.Tensor]:
        """The plan at each image's final level and its probe level (-1: not probed), deciding
        the cascade with the masked reference."""
        probe, target, tau = self.routes(plan)
        if self.training or bool((target == probe).all()):
            return self.level_plan(plan, probe), torch.full_like(probe, -1)
        levels = torch.arange(self.num_levels, device=x.device)

        def run(level: int, images: torch.Tensor) -> torch.Tensor:
            first = torch.zeros(len(images), dtype=torch.long, device=x.device)
            sub = self.level_plan(plan.rows(first), levels[level].expand(len(images)))
            return super(LevelNetwork, self).run_extra(images, sub)[0]

        _, final, escalated = cascade(run, x, probe, target, tau)
        return self.level_plan(plan, final), torch.where(escalated, probe, -1)

    def run_extra(self, x: torch.Tensor, plan: BudgetPlan):
        routed, probed = self.route(x, plan)
        logits, masks, scores, extra = super().run_extra(x, routed)
        return logits, masks, scores, {**extra, "probed": probed}

    def compact_state(self, x: torch.Tensor, plan: BudgetPlan) -> dict:
        routed, probed = self.route(x, plan)
        plan.counts = routed.counts  # the compact steps select from the routed counts
        return {"x": x, "probed": probed}

    def compact_extra(self, state: dict) -> dict:
        return {"probed": state["probed"]}

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1,
             probed: torch.Tensor | None = None, **extra) -> Cost:
        """`GatedNetwork.macs`, plus each escalated image's probe level (`probed`, -1: none)
        as gate MACs."""
        cost = super().macs(masks, height, width, batch, **extra)
        if probed is not None and bool((probed >= 0).any()):
            macs = torch.tensor([0, *self.level_costs(height, width)[0]], device=cost.executed.device)
            spent = macs[probed.to(cost.executed.device) + 1]
            cost.executed = cost.executed + spent
            cost.gates = cost.gates + spent
        return cost
