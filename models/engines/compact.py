"""Compact inference: skipped channels are never computed.

A network's compact executor is the list of its units' steps (`Unit.steps()`, in order)
over a batch state (a dict of batch-first tensors). A gated step decides its keep-mask,
then computes only the kept channels. Samples that keep the same number of channels run
together (one batched/grouped op per layer); when a gated layer's counts differ across the
batch, the batch splits into groups of equal counts, each running on by itself.
A step whose output has one shape whatever it keeps (`Step.merges`: DFS's blocks) runs each
group and puts the batch back together, so the groups do not split the steps after it.
`per_sample=True` runs every sample alone instead.

Under the `threshold` policy a step that can zero channels (`Step.zero`) runs a batch in one
pass instead: it computes the union of the batch's kept channels with one shared weight (a
plain convolution, the fastest kernel), then zeros in each sample the channels it did not
keep, so every sample's result is the one it gets alone. The union is what was executed,
and its masks and MACs report it. A larger batch runs in chunks of UNION_BATCH images.
"""

from __future__ import annotations

import torch

from ..core.base import ForwardInfo, GatedNetwork
from ..core.budget import BudgetPlan
from ..core.registry import registered
from ..core.units import Step

State = dict
UNION_BATCH = 8  # a threshold batch shares unions in chunks of this many images: a larger
# chunk's union nears every channel (0.82 of the MACs for 200 images at budget 0.5)


def rows_of(state: State, index: torch.Tensor) -> State:
    """The state of a subset of the batch; a tensor of one row is shared by the batch."""
    return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] > 1 else v
            for k, v in state.items()}


def merged(step: Step, state: State, keep: torch.Tensor, key: torch.Tensor) -> State:
    """`step` run on each group of samples with equal `key`, the groups' states put back
    together (a step that `merges`); a tensor the batch shares stays shared."""
    batch, out = key.shape[0], {}
    shared = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1}
    for value in key.unique():
        rows = (key == value).nonzero().flatten()
        for k, v in step.apply(rows_of(state, rows), keep[rows]).items():
            if not isinstance(v, torch.Tensor) or not v.dim() or k in shared:
                out[k] = v
                continue
            if k not in out:
                out[k] = v.new_empty(batch, *v.shape[1:])
            out[k][rows] = v
    return out


def model_steps(model: GatedNetwork) -> list[Step]:
    """The compact steps of a model's units, in order (the model in eval mode)."""
    with torch.no_grad():
        return [step for unit in model.eval().units() for step in unit.steps()]


class CompactExecutor:
    """Runs a network's compact steps with the network's budget policies (puts the model in
    eval mode)."""

    def __init__(self, model: GatedNetwork, steps: list[Step] | None = None) -> None:
        """`steps`: the model's steps as another engine realizes them (default: its own)."""
        self.model = model.eval()
        self.steps = steps or model_steps(model)
        gated = [step for step in self.steps if step.gate is not None]
        if len(gated) != len(model.gated_totals()):
            raise ValueError(f"{type(model).__name__}'s units give {len(gated)} gated steps for "
                             f"{len(model.gated_totals())} gated layers")
        for index, step in enumerate(gated):
            step.gated_index = index

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, budget=None, policy: str = "threshold",
                 return_info: bool = False, per_sample: bool = False):
        self.model.check_input(x)
        plan = self.model.plan(budget, policy, x.shape[0], x.device)
        state = self.model.compact_state(x, plan)
        if per_sample and x.shape[0] > 1:
            logits, masks = self._split(state, plan, 0, None, torch.arange(x.shape[0]))
        elif x.shape[0] > UNION_BATCH and any(self._unites(s, policy) for s in self.steps):
            chunks = torch.arange(x.shape[0], device=x.device) // UNION_BATCH
            logits, masks = self._split(state, plan, 0, None, chunks)
        else:
            logits, masks = self._execute(state, plan, 0, None)
        if not return_info:
            return logits
        cost = self.model.macs(masks, *x.shape[-2:], batch=x.shape[0], **self.model.compact_extra(state))
        return logits, ForwardInfo(plan, masks, [], cost)

    @staticmethod
    def _unites(step: Step, policy: str) -> bool:
        """Whether `step` runs a batch's union of kept channels (threshold, a step that can zero)."""
        return step.zero is not None and policy == "threshold"

    def _execute(self, state: State, plan: BudgetPlan, pos: int, keep: torch.Tensor | None):
        masks = []
        for i in range(pos, len(self.steps)):
            step = self.steps[i]
            if step.gate is not None:
                if keep is None:
                    keep = plan.select(step.gated_index, step.gate(state), step.groups)
                    if keep.shape[0] > 1 and self._unites(step, plan.policy):
                        union = keep.any(0, keepdim=True)
                        state = step.zero(step.apply(state, union), keep[:, union[0]])
                        masks.append(union.expand_as(keep))
                        keep = None
                        continue
                    key = step.key(keep) if keep.shape[0] > 1 else None
                    if key is not None and (key != key[0]).any():
                        if step.merges:
                            masks.append(keep)
                            state, keep = merged(step, state, keep, key), None
                            continue
                        logits, rest = self._split(state, plan, i, keep, key)
                        return logits, masks + rest
                masks.append(keep)
            state = step.apply(state, keep)
            keep = None
        return state["logits"], masks

    def _split(self, state: State, plan: BudgetPlan, pos: int, keep, key: torch.Tensor):
        """Run each group of samples with equal `key` on its own from step `pos`; reassemble."""
        logits, masks = None, None
        for value in key.unique():
            rows = (key == value).nonzero().flatten()
            sub_keep = None if keep is None else keep[rows]
            sub_logits, sub_masks = self._execute(rows_of(state, rows), plan.rows(rows), pos,
                                                  sub_keep)
            if logits is None:
                logits = sub_logits.new_empty(key.shape[0], *sub_logits.shape[1:])
                masks = [m.new_empty(key.shape[0], *m.shape[1:]) for m in sub_masks]
            logits[rows] = sub_logits
            for full, part in zip(masks, sub_masks, strict=True):
                full[rows] = part
        return logits, masks


def compact(model: GatedNetwork) -> CompactExecutor:
    """The compact executor of a registered model (puts the model in eval mode)."""
    registered(model)
    return CompactExecutor(model)
