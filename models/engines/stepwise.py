"""Engine: a network's compact steps with their kernels compiled by OpenVINO.

A step that comes with kernels (`Step.kernels`: a plain module per level) runs them, each
compiled once for the CPU (a dynamic batch at the network's input size), in place of its
torch `apply`; its gate still scores in torch, and steps without kernels (a stem, a head)
run in torch. The compact executor walks these steps as it walks the torch ones: the
samples of a batch that take the same level run as one batch. A FakeQuantize op in a
kernel (DFS's 8-bit level) runs in int8. Images of another size run the torch steps.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.base import GatedNetwork
from ..core.units import Kernels, Step
from .compact import CompactExecutor, model_steps
from .openvino_compile import convolution_precisions, openvino_infer, openvino_requests


def has_kernels(model: GatedNetwork) -> bool:
    """Whether any of the model's steps comes with kernels."""
    return any(step.kernels is not None for step in model_steps(model))


def input_shapes(model: GatedNetwork, steps: list[Step]) -> list[tuple[int, ...]]:
    """The (C, H, W) each step's kernels read at the network's input size (every gated step
    at its widest)."""
    size = model.input_size
    x = torch.zeros(1, 3, size, size)
    state = model.compact_state(x, model.plan(1.0, "threshold", 1, x.device))
    shapes = []
    with torch.no_grad():
        for step, total in zip(steps, step_totals(model, steps), strict=True):
            reads = step.kernels.reads if step.kernels else "h"
            shapes.append(tuple(state[reads].shape[1:]) if reads in state else ())
            keep = None if total is None else torch.ones(1, total, dtype=torch.bool)
            state = step.apply(state, keep)
    return shapes


def step_totals(model: GatedNetwork, steps: list[Step]) -> list[int | None]:
    """Each step's gated channel count (None: ungated)."""
    totals = iter(model.gated_totals())
    return [None if step.gate is None else next(totals) for step in steps]


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


class StepwiseExecutor:
    """The compact executor over OpenVINO-compiled kernels (torch for other input sizes)."""

    runtime_name = "openvino-steps"

    def __init__(self, model: GatedNetwork, precision: str = "f32", threads: int = 1) -> None:
        self.model = model.float().eval()
        self.fallback = CompactExecutor(model)
        steps = self.fallback.steps
        shapes = {}  # each kernel's input shape; a module serving several levels compiles once
        for step, shape in zip(steps, input_shapes(model, steps), strict=True):
            for module in step.kernels.modules if step.kernels else []:
                if module is not None:
                    shapes.setdefault(module, shape)
        requests = openvino_requests(list(shapes), list(shapes.values()), precision, threads)
        compiled = dict(zip(shapes, requests, strict=True))
        self.requests = [None if step.kernels is None else [compiled.get(m) for m in step.kernels.modules]
                         for step in steps]
        self.compiled = CompactExecutor(model, [step if requests is None else compiled_step(step, requests)
                                                for step, requests in zip(steps, self.requests, strict=True)])

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        size = self.model.input_size
        executor = self.compiled if x.shape[-2:] == (size, size) else self.fallback
        return executor(x.float(), *args, **kwargs)

    def kernel_precisions(self) -> list[list[list[str]]]:
        """Per step with kernels, per level, the precisions its convolutions run in (u8 or i8:
        int8 kernels; [] for a skipped level)."""
        return [[[] if r is None else convolution_precisions(r) for r in requests]
                for requests in self.requests if requests is not None]
