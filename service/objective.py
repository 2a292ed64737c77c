"""The latency objective: how far to lower the budgets of queued work so that it finishes in
time. A budget cap applies to every queued image alike (each image keeps its own requested
budget as a ceiling and its `min_budget` as a floor), so the lowering is as small and as even
as it can be; it falls at once when the queue grows and rises back at RISE_PER_S."""

from __future__ import annotations

import numpy as np

STEP = 0.025  # the cap's resolution
RISE_PER_S = 2.0  # how fast the cap may rise once the queue no longer needs it (no flapping)


class TimeModel:
    """Seconds per image at a budget: measured at warm-up (per width level, or at the floor and
    at full budget), scaled by how the batches served since compare with that."""

    def __init__(self) -> None:
        self.budgets, self.seconds, self.scale = [0.0, 1.0], [0.0, 0.0], 1.0

    def measured(self, points: dict[float, float]) -> None:
        """Warm-up timings: {budget: seconds per image}."""
        self.budgets, self.seconds = [list(v) for v in zip(*sorted(points.items()), strict=True)]

    def __call__(self, budget: float) -> float:
        return self.scale * float(np.interp(budget, self.budgets, self.seconds))

    def observe(self, budgets: list[float], elapsed: float) -> None:
        """A served batch: its images' budgets and its wall time."""
        predicted = float(np.interp(budgets, self.budgets, self.seconds).sum())
        if predicted > 0:
            self.scale = 0.8 * self.scale + 0.2 * elapsed / predicted
        else:  # never warmed up: one flat figure until then
            self.seconds = [elapsed / len(budgets)] * len(self.budgets)


def run_budget(job, cap: float) -> float:
    """The budget a job runs at under a cap: its own budget, lowered to the cap, never below its
    min_budget."""
    return min(job.budget, max(cap, job.min_budget))


def budget_cap(jobs, now: float, objective: float, seconds: TimeModel) -> float:
    """The highest cap (a multiple of STEP) under which the jobs, run in order, each finish
    within `objective` seconds of arriving; 0 when even their floors do not."""
    for step in range(round(1 / STEP), -1, -1):
        cap, finish = step * STEP, now
        for job in jobs:
            finish += job.size * seconds(run_budget(job, cap))
            if finish > job.enqueued + objective:
                break
        else:
            return cap
    return 0.0


class Objective:
    """A model's latency objective: the cap for the next batch, from the queue."""

    def __init__(self, seconds: float, times: TimeModel, now: float) -> None:
        self.seconds, self.times = seconds, times
        self.cap, self.at = 1.0, now

    def lower(self, batch: list, queue, now: float) -> None:
        """Set each job of the batch about to run to the budget it runs at, and why."""
        best = budget_cap([*batch, *queue], now, self.seconds, self.times)
        self.cap = min(best, self.cap + RISE_PER_S * (now - self.at))
        self.at = now
        waiting = sum(job.size for job in queue)
        for job in batch:
            job.run_budget = run_budget(job, self.cap)
            if job.run_budget < job.budget:
                job.lowered = (f"latency objective {1000 * self.seconds:g} ms: {waiting} images "
                               f"queued behind this batch; ran at budget {job.run_budget:g} "
                               f"(requested {job.budget:g}, min_budget {job.min_budget:g})")
