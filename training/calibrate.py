"""Closed-loop calibration of the budget table on the calibration split (held out of train).

Closed loop: the masks are applied while measuring, so every gate reads what the layers
before it really computed, and the executed MACs are those the threshold policy spends in
serving. Costs are in the network's budget unit (`budget_ratio`: executed MACs; BitOps for
DFS). For each budget b of a grid (the floor, then every `step` up to 1.0):

- tau(b): the smallest threshold whose mean executed-MAC ratio over the calibration images
  is <= b, by a sweep of thresholds, then regula falsi; all budgets' candidate thresholds
  run in one batched pass, each image repeated once per budget with its own threshold. The
  sweep ends above 1 (TAU_CLOSED: every gate closed, the floor), so a budget that even
  tau = 1.0 overspends (gates saturated at a score of 1.0) gets a threshold above 1.
- counts_l(b), for topk and cap: where the threshold policy spends at tau(b) (each layer's
  mean kept fraction), scaled as high as a cost <= b allows, never below the counts of the
  next lower budget; what is left of b then goes a channel group at a time to the layer least
  filled against that spending, so no layer is starved while another fills up.

So the table is monotone: tau never increases and no count decreases with the budget.

A slimmable network's cost does not depend on the input: its table is exact without data,
and calibration re-estimates each width's BN statistics instead (`recalibrate_network`).

A network of width levels (`LevelNetwork`) keeps its exact table for topk, and calibration
fits its threshold cascade (`fit_cascade`): for every budget of a fine grid, the probe level,
the target level and the uncertainty threshold that give the best top-1 on the calibration
images at a mean cost of the budget.
"""

from __future__ import annotations

import copy

import torch

from models.core.base import GatedNetwork
from models.core.budget import TAU_CLOSED, CalibrationTable, budget_grid
from models.core.levels import LevelNetwork, uncertainty
from models.engines.variants import VariantExecutor

from .data import normalize
from .evaluate import measure


@torch.no_grad()
def threshold_pass(model: GatedNetwork, images: torch.Tensor, taus: torch.Tensor, mean, std,
                   device: torch.device | str = "cpu", batch_size: int = 512):
    """Closed-loop budget ratios (K, N) of every image at each of K thresholds, and
    each layer's mean kept channels (K, L)."""
    model.eval()
    k, layers = len(taus), len(model.gated_totals())
    per = max(1, batch_size // k)
    ratios, kept = [], torch.zeros(k, layers, dtype=torch.float64)
    for start in range(0, len(images), per):
        x = normalize(images[start : start + per].to(device), mean, std)
        b = x.shape[0]
        tau = taus.float().to(device).repeat_interleave(b)
        plan = model.plan((1 - tau).clamp(0, 1), "threshold", k * b, device)
        plan.tau = tau  # each image copy's own threshold
        _, masks, _ = model.run(x.repeat(k, 1, 1, 1), plan)
        cost = model.macs([m > 0 for m in masks], *x.shape[-2:])
        ratios.append(model.budget_ratio(cost).view(k, b).cpu())
        kept += cost.kept.view(k, b, layers).sum(1).cpu()
    return torch.cat(ratios, 1), kept / len(images)


SWEEP_POINTS = 24


def calibrate(model: GatedNetwork, images: torch.Tensor, mean, std, device="cpu", step: float = 0.05,
              iterations: int = 5) -> CalibrationTable:
    """A monotone closed-loop table for the model from uint8 calibration images (the exact
    data-free table for a network whose cost does not depend on the input).

    tau(b) for every budget at once: a sweep of SWEEP_POINTS + 1 thresholds over [0, 1] and
    TAU_CLOSED brackets each budget's threshold, then `iterations` rounds of regula falsi
    (the secant point within the bracket, Illinois variant) narrow the brackets; each budget
    gets its bracket's upper end, the lowest threshold measured to fit."""
    if not model.gated or not model.adaptive:
        return model.uniform_table()
    floor = model.floor()
    budgets = budget_grid(floor, step)
    target = torch.tensor(budgets, dtype=torch.float64) + 1e-9
    sweep = torch.cat([torch.linspace(0, 1, SWEEP_POINTS + 1), torch.tensor([TAU_CLOSED])])
    swept = threshold_pass(model, images, sweep, mean, std, device)[0].mean(1)
    fits = swept[None, :] <= target[:, None]
    first = torch.where(fits.any(1), fits.int().argmax(1), len(sweep) - 1)
    hi, r_hi = sweep[first].double(), swept[first]
    below = (first - 1).clamp(min=0)
    lo = torch.where(first > 0, sweep[below].double(), hi)
    r_lo = torch.where(first > 0, swept[below], r_hi)
    f_lo, f_hi = r_lo - target, r_hi - target  # > 0 (too costly) and <= 0 (fits)
    side = torch.zeros(len(budgets))  # which end the last round moved: 1 hi, -1 lo
    for _ in range(iterations):
        width = hi - lo
        step_in = f_lo / (f_lo - f_hi).clamp(min=1e-12)
        guess = (lo + step_in * width).clamp(lo + 0.01 * width, hi - 0.01 * width)
        ratio = threshold_pass(model, images, guess.float(), mean, std, device)[0].mean(1)
        ok = ratio <= target
        # Illinois: an end kept twice in a row has its residual halved, so it moves next time
        f_lo = torch.where(ok & (side == 1), f_lo / 2, f_lo)
        f_hi = torch.where(~ok & (side == -1), f_hi / 2, f_hi)
        hi, f_hi = torch.where(ok, guess, hi), torch.where(ok, ratio - target, f_hi)
        lo, f_lo = torch.where(ok, lo, guess), torch.where(ok, f_lo, ratio - target)
        side = torch.where(ok, 1.0, -1.0)
    return table_at(model, images, budgets, hi.float().cummin(0).values.tolist(), mean, std, device)


def table_at(model: GatedNetwork, images: torch.Tensor, budgets: list[float], taus: list[float],
             mean, std, device="cpu") -> CalibrationTable:
    """The closed-loop table of thresholds `taus` (one per budget, not increasing): each
    budget's topk/cap counts from the threshold policy's per-layer spending at its tau on
    the images."""
    ratio, kept = threshold_pass(model, images, torch.tensor(taus), mean, std, device)
    counts = [[0] * len(model.gated_totals())]
    for layer_kept, b in zip(kept, budgets, strict=True):
        counts.append(fitted_counts(model, layer_kept, b, counts[-1]))
    extra = {"method": "closed-loop bisection of tau; counts follow the threshold policy's "
                       "per-layer spending", "images": len(images),
             "threshold_ratio_mean": [round(v, 4) for v in ratio.mean(1).tolist()],
             "threshold_ratio_p95": [round(v, 4) for v in ratio.quantile(0.95, dim=1).tolist()]}
    return CalibrationTable(budgets, [round(t, 6) for t in taus], counts[1:], model.floor(),
                            "closed-loop", extra)


def refit_counts(model: GatedNetwork, images: torch.Tensor, mean, std, device="cpu") -> CalibrationTable:
    """The model's closed-loop table with its thresholds kept and its topk/cap counts fitted
    again on the images (one threshold pass instead of a calibration's search)."""
    table = model.table
    if table.source != "closed-loop":
        raise ValueError(f"only a closed-loop table keeps its thresholds (this one is {table.source!r})")
    return table_at(model, images, table.budgets, table.taus, mean, std, device)


CASCADE_STEP = 0.01  # budget spacing of the cascade rows: a request runs the row at or below it
TRACK = 0.01  # a cascade row's mean cost on the calibration images is within this of its budget
NEVER_TAU = 2.0  # above every uncertainty (1 - p <= 1): no image escalates


@torch.no_grad()
def level_logits(model: LevelNetwork, images: torch.Tensor, mean, std, device="cpu",
                 batch_size: int = 500) -> torch.Tensor:
    """(levels, N, classes) logits of every width level on uint8 images (torch variants)."""
    executor = VariantExecutor(model, "torch", device=device)
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        out.append(torch.stack([executor.runtime(level, x).cpu() for level in range(model.num_levels)], 1))
    return torch.cat(out).transpose(0, 1)


def fit_cascade(ratios: list[float], logits: torch.Tensor, labels: torch.Tensor,
                budgets: list[float], cap: bool = False) -> list[list[float]]:
    """Cascade rows [budget, probe, target, tau] with the best top-1 on the images for each
    budget (`ratios`: each level's cost; `logits`: (levels, N, classes)). threshold: the
    (probe, target) pair whose mean cost, escalating the most uncertain images, meets the
    budget (within TRACK); `cap`: pairs whose probe plus target cost fits the budget, with
    the best number of escalations. The widest level within the budget (no probe) is a
    candidate too; the full budget runs the full network."""
    n = labels.shape[0]
    correct = (logits.argmax(2) == labels[None]).double()
    full = len(ratios) - 1
    rows = []
    for b in budgets:
        if b >= 1.0 - 1e-9:  # the full budget runs the full network, as the dense one does
            rows.append([b, full, full, NEVER_TAU])
            continue
        within = [lv for lv, r in enumerate(ratios) if r <= b + 1e-9] or [0]
        # candidates ranked by (mean cost tracks the budget, or cap; top-1)
        best = ((cap or ratios[within[-1]] >= b - TRACK, correct[within[-1]].mean().item()),
                [b, within[-1], within[-1], NEVER_TAU])
        for p in within:
            u = uncertainty(logits[p])
            order = u.argsort(descending=True)
            stopped = correct[p].sum() - torch.cat([torch.zeros(1, dtype=torch.float64),
                                                    correct[p][order].cumsum(0)])
            for t in range(p + 1, len(ratios)):
                escalated = torch.cat([torch.zeros(1, dtype=torch.float64), correct[t][order].cumsum(0)])
                top1 = (escalated + stopped) / n  # top-1 escalating the k most uncertain, k = 0..n
                if cap:
                    if ratios[p] + ratios[t] > b + 1e-9:
                        continue
                    k = int(top1[1:].argmax()) + 1
                else:
                    k = min(n, int((b - ratios[p]) * n / ratios[t] + 1e-9))
                    if k <= 0:
                        continue
                key = (cap or ratios[p] + k / n * ratios[t] >= b - TRACK, float(top1[k]))
                if key > best[0]:
                    best = (key, [b, p, t, float(u[order[k - 1]])])
        rows.append(best[1])
    return rows


def cascade_table(model: LevelNetwork, images: torch.Tensor, labels: torch.Tensor, mean, std,
                  device="cpu") -> CalibrationTable:
    """The model's exact table with its threshold cascade fitted on calibration images."""
    table = model.uniform_table()
    ratios = model.level_costs(model.input_size, model.input_size)[1]
    logits = level_logits(model, images, mean, std, device)
    budgets = budget_grid(table.floor, CASCADE_STEP)
    cascades = {policy: [[round(b, 6), p, t, round(tau, 6)] for b, p, t, tau in
                         fit_cascade(ratios, logits, labels.cpu(), budgets, cap=policy == "cap")]
                for policy in ("threshold", "cap")}
    top1 = [round(v, 4) for v in (logits.argmax(2) == labels.cpu()[None]).double().mean(1).tolist()]
    extra = {**table.extra, "cascade": cascades,
             "cascade_method": "confidence cascade: probe level, then the target level for images "
                               "whose uncertainty (1 - top-1 probability) >= tau; fitted for the "
                               "best top-1 at a mean cost of each budget (threshold), or with "
                               "probe plus target within it (cap)", "images": len(images),
             "level_top1": top1}
    return CalibrationTable(table.budgets, table.taus, table.counts, table.floor, "cascade", extra)


def fitted_counts(model: GatedNetwork, kept: torch.Tensor, budget: float, lower: list[int],
                  iterations: int = 30) -> list[int]:
    """Per-layer counts proportional to `kept`, never below `lower` (the next lower budget's
    counts, whose cost fits), scaled as high as a cost <= budget allows; then the budget left
    is filled a channel group at a time, to the layer least filled against its use."""
    totals, groups = model.gated_totals(), model.gated_groups()
    profile = (kept / torch.tensor(totals, dtype=torch.float64)).tolist()

    def scaled(scale: float) -> list[int]:
        return [max(low, min(t, int(scale * p * t / g + 1e-9) * g))
                for p, t, g, low in zip(profile, totals, groups, lower, strict=True)]

    def fits(counts: list[int]) -> bool:
        return float(model.budget_ratio(model.count_cost(counts))[0]) <= budget + 1e-9

    lo, hi = 0.0, 1.0 / max(min((p for p in profile if p > 0), default=1.0), 1e-6)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(scaled(mid)) else (lo, mid)
    counts = scaled(hi) if fits(scaled(hi)) else scaled(lo)
    # then one group at a time to the layer least filled against the threshold policy's use of
    # it, stopping when that one does not fit (what is left waits for a higher budget): filling
    # whichever layer still fits let cheap layers fill up while costly ones stayed at 0
    want = [p * t for p, t in zip(profile, totals, strict=True)]
    growing = [i for i, w in enumerate(want) if w > 0]
    while growing:
        layer = min(growing, key=lambda i: counts[i] / want[i])
        trial = list(counts)
        trial[layer] += groups[layer]
        if trial[layer] > totals[layer]:
            growing.remove(layer)
            continue
        if not fits(trial):
            break
        counts = trial
    return counts


def recalibrate_network(model: GatedNetwork, images: torch.Tensor, mean, std, device="cpu",
                        batch_size: int = 256) -> int:
    """The network's own re-estimation after training (`GatedNetwork.recalibrate`: a slimmable
    network's per-width BN statistics) on uint8 images; returns batches read (0: none needed)."""
    batches = (normalize(images[start : start + batch_size].to(device), mean, std)
               for start in range(0, len(images), batch_size))
    return model.recalibrate(batches)


@torch.no_grad()
def bn_check(model: GatedNetwork, images: torch.Tensor, labels: torch.Tensor, mean, std,
             device="cpu", budgets=(0.25, 0.5, 0.75, 1.0)) -> list[dict]:
    """Would BN statistics re-estimated per budget bucket help? For each budget: top-1 and
    executed-MAC ratio (threshold policy) on every other image, with the trained BN statistics
    and with statistics re-estimated at that budget on the images in between."""
    fit, held = images[0::2], (images[1::2], labels[1::2])
    rows = []
    for budget in (b for b in budgets if b >= model.floor()):
        recal = copy.deepcopy(model).train()
        for m in recal.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches
        for start in range(0, len(fit), 256):
            recal(normalize(fit[start : start + 256].to(device), mean, std), budget=budget)
        row = {"budget": budget}
        for key, net in (("trained", model), ("re-estimated", recal)):
            correct, ratio, _ = measure(net, *held, budget, "threshold", mean, std, device)
            row[f"top1_{key}"] = round(correct.float().mean().item(), 4)
            row[f"ratio_{key}"] = round(ratio.mean().item(), 4)
        rows.append(row)
    return rows
