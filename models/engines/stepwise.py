"""Engine: a network's compact steps with their kernels compiled by OpenVINO.

A step that comes with kernels (`Step.kernels`: a plain module per level) runs them, each
compiled once for the CPU (a dynamic batch at the network's input size), in place of its
torch `apply`; its gate still scores in torch, and steps without kernels (a stem, a head)
run in torch. The compact executor walks these steps as it walks the torch ones: the
samples of a batch that take the same level run as one batch. A FakeQuantize op in a
kernel (DFS's 8-bit level) runs in int8. Images of another size run the torch steps.

Under `topk` every image of a budget keeps the same counts (a row of the table), so where
the network builds that configuration as one module (`GatedNetwork.fixed`) each row is
compiled whole too, and a batch of one such row runs as one call: no call per step, no
gate (a gate call and a model boundary cost about as much as a small block).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.base import ForwardInfo, GatedNetwork
from ..core.budget import prefix_mask
from ..core.units import Kernels, Step
from .compact import CompactExecutor, model_steps
from .openvino_compile import (
    chained,
    compiled_request,
    convolution_precisions,
    openvino_infer,
    openvino_models,
)


def has_kernels(model: GatedNetwork) -> bool:
    """Whether the model has gated steps and every one comes with kernels."""
    gated = [step for step in model_steps(model) if step.gate is not None]
    return bool(gated) and all(step.kernels is not None for step in gated)


def input_shapes(model: GatedNetwork, steps: list[Step]) -> list[tuple[int, ...]]:
    """The (C, H, W) each step's kernels read at the network's input size (every gated step
    at its widest; the steps numbered by a compact executor)."""
    size, totals = model.input_size, model.gated_totals()
    x = torch.zeros(1, 3, size, size)
    state = model.compact_state(x, model.plan(1.0, "threshold", 1, x.device))
    shapes = []
    with torch.no_grad():
        for step in steps:
            reads = step.kernels.reads if step.kernels else "h"
            shapes.append(tuple(state[reads].shape[1:]) if reads in state else ())
            keep = None if step.gate is None else torch.ones(1, totals[step.gated_index], dtype=torch.bool)
            state = step.apply(state, keep)
    return shapes


def compiled_step(step: Step, requests: list) -> Step:
    """`step` running its kernels' compiled `requests` (one a level) in place of its apply."""
    kernels: Kernels = step.kernels

    def apply(state: dict, keep) -> dict:
        request = requests[0 if keep is None else int(keep[0].sum())]  # one level per call
        if request is None:
            return state
        rest = {k: v for k, v in state.items() if k != kernels.reads}
        return rest | {kernels.writes: openvino_infer(request, state[kernels.reads])}
    return dataclasses.replace(step, apply=apply)


def configurations(model: GatedNetwork, steps: list[Step]) -> dict[tuple, list[nn.Module]]:
    """Each distinct counts row of the model's table (a `topk` configuration: every image
    alike) as the sequence of kernels it runs, where every step has kernels; else none."""
    if any(step.kernels is None for step in steps):
        return {}
    rows = {}
    for row in sorted({tuple(r) for r in model.table.counts}):
        chosen = [step.kernels.modules[0 if step.gate is None else row[step.gated_index]] for step in steps]
        rows[row] = [m for m in chosen if m is not None]
    return rows


class StepwiseExecutor:
    """The compact executor over OpenVINO-compiled kernels (torch for other input sizes);
    `topk` batches of one configuration as one compiled call."""

    runtime_name = "openvino-steps"

    def __init__(self, model: GatedNetwork, precision: str = "f32", threads: int = 1) -> None:
        self.model = model.float().eval()
        self.fallback = CompactExecutor(model)
        steps = self.fallback.steps
        shapes = {}  # each kernel's input shape; a module serving several levels converts once
        for step, shape in zip(steps, input_shapes(model, steps), strict=True):
            for module in step.kernels.modules if step.kernels else []:
                if module is not None:
                    shapes.setdefault(module, shape)
        graphs = dict(zip(shapes, openvino_models(list(shapes), list(shapes.values())), strict=True))
        compiled = {m: compiled_request(graph, precision, threads) for m, graph in graphs.items()}
        self.requests = [None if step.kernels is None else [compiled.get(m) for m in step.kernels.modules]
                         for step in steps]
        self.compiled = CompactExecutor(model, [step if requests is None else compiled_step(step, requests)
                                                for step, requests in zip(steps, self.requests, strict=True)])
        self.fixed = {row: compiled_request(chained([graphs[m] for m in kernels]), precision, threads)
                      for row, kernels in configurations(model, steps).items()}

    def __call__(self, x: torch.Tensor, budget=None, policy: str = "threshold", return_info: bool = False,
                 per_sample: bool = False):
        x, model = x.float(), self.model
        size = model.input_size
        if x.shape[-2:] != (size, size):
            return self.fallback(x, budget, policy, return_info, per_sample)
        if policy == "topk" and self.fixed:  # every image at the same counts: one whole call
            model.check_input(x)
            plan = model.plan(budget, policy, x.shape[0], x.device)
            counts = plan.counts
            if (counts == counts[0]).all():
                logits = openvino_infer(self.fixed[tuple(counts[0].tolist())], x)
                if not return_info:
                    return logits
                masks = [prefix_mask(counts[:, i], total) for i, total in enumerate(model.gated_totals())]
                return logits, ForwardInfo(plan, masks, [], model.macs(masks, size, size, batch=x.shape[0]))
        return self.compiled(x, budget, policy, return_info, per_sample)

    def kernel_precisions(self) -> list[list[list[str]]]:
        """Per gated step, per level, the precisions its convolutions run in (u8 or i8: int8
        kernels; [] for a skipped level)."""
        return [[[] if r is None else convolution_precisions(r) for r in requests]
                for step, requests in zip(self.fallback.steps, self.requests, strict=True)
                if requests is not None and step.gate is not None]
