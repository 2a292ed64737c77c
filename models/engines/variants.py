"""Engines: what runs a network that comes as dense variants (`GatedNetwork.variants()`).

A network with variants (a dense baseline, the width levels of a `LevelNetwork`) runs each
variant as one dense model with prepacked weights: on the CPU in OpenVINO when it is
installed (`OpenVINORuntime`, compiled at load, in bfloat16 or float32), else and on CUDA in
torch (`TorchRuntime`, contiguous slices, no gathers). `VariantExecutor` routes every image
to a variant (`models.core.levels.cascade`), runs the images of one variant as one batch
and charges each image the MACs of the variants it ran. A network without variants runs on
the compact executor: its steps' kernels compiled by OpenVINO where it has them
(`stepwise`), else in torch. Networks do not know which engine runs them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..core.base import ForwardInfo, GatedNetwork
from ..core.budget import prefix_mask
from ..core.levels import LevelNetwork, cascade
from ..core.macs import Cost
from .compact import CompactExecutor
from .openvino_compile import openvino_available, openvino_infer, openvino_requests
from .stepwise import StepwiseExecutor, has_kernels

RUNTIMES = ("auto", "openvino", "torch")


class TorchRuntime:
    """Variants as eager torch modules in one dtype."""

    name = "torch"

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype) -> None:
        self.modules = [m.to(dtype).eval() for m in modules]
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return self.modules[level](x.to(self.dtype)).float()


class OpenVINORuntime:
    """Variants compiled by OpenVINO for the CPU (dynamic batch, a fixed image size), one
    infer request each, in `precision` ("bf16" or "f32")."""

    name = "openvino"

    def __init__(self, modules: list[nn.Module], size: int, precision: str, threads: int) -> None:
        self.size, self.precision = size, precision
        self.requests = openvino_requests(modules, [(3, size, size)] * len(modules), precision, threads)

    def __call__(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return openvino_infer(self.requests[level], x)


def pick_runtime(setting: str, device: torch.device) -> str:
    """The runtime for a device: auto is OpenVINO on the CPU where installed, else torch."""
    if setting not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {setting!r}")
    if setting == "openvino" and (device.type != "cpu" or not openvino_available()):
        raise ValueError("runtime openvino needs the CPU and the openvino package")
    if setting == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    return setting


class VariantExecutor:
    """Runs a network's variants on a runtime: each image routed to one (or a probe, then a
    wider one), the images of a variant in one batch, each charged its variants' MACs."""

    def __init__(self, model: GatedNetwork, runtime: str = "auto", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", threads: int | None = None,
                 modules: list[nn.Module] | None = None) -> None:
        """`modules`: the model's variants, if the caller has built them already."""
        self.model = model.eval()
        modules = model.variants() if modules is None else modules
        self.device = torch.device(device)
        self.runtime_name = pick_runtime(runtime, self.device)
        openvino = None
        if self.runtime_name == "openvino":  # compiled from the float32 modules, before the
            precision = "bf16" if dtype == torch.bfloat16 else "f32"  # fallback casts them
            openvino = OpenVINORuntime(modules, model.input_size, precision,
                                       threads or torch.get_num_threads() or os.cpu_count())
        self.fallback = TorchRuntime([m.to(self.device) for m in modules], dtype)
        self.runtime = openvino or self.fallback
        self.levels = isinstance(model, LevelNetwork)
        self.totals = model.gated_totals()
        self._costs: dict[tuple[int, int], tuple] = {}

    def _level_costs(self, height: int, width: int) -> tuple:
        """(dense MACs, executed MACs per level, kept counts per level (levels, L), each gated
        layer's prefix masks per level (levels, C_l))."""
        if (height, width) not in self._costs:
            model = self.model
            dense = model.count_cost(list(self.totals), height, width)
            if self.levels:
                executed, kept = model.level_costs(height, width)[0], model.levels_counts(torch.device("cpu"))
            else:
                executed = [int(dense.executed[0])]
                kept = torch.tensor([self.totals], dtype=torch.long).reshape(1, -1)
            masks = [prefix_mask(kept[:, i], total) for i, total in enumerate(self.totals)]
            self._costs[height, width] = (dense.dense, torch.tensor(executed), kept, masks)
        return self._costs[height, width]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, budget=None, policy: str = "threshold",
                 return_info: bool = False, per_sample: bool = False):
        """Logits (float32) and, with return_info, the plan, masks and cost of every image.
        `per_sample`: every image alone (a check that batching changes nothing)."""
        model = self.model
        model.check_input(x)
        batch = x.shape[0]
        plan = model.plan(budget, policy, batch, x.device)
        if self.levels:
            probe, target, tau = model.routes(plan)
        else:
            probe = target = torch.zeros(batch, dtype=torch.long, device=x.device)
            tau = torch.full((batch,), float("inf"), device=x.device)
        runtime = self.runtime if x.shape[-1] == x.shape[-2] == model.input_size else self.fallback
        if per_sample and batch > 1:
            parts = [cascade(runtime, x[i : i + 1], probe[i : i + 1], target[i : i + 1], tau[i : i + 1])
                     for i in range(batch)]
            logits, final, escalated = (torch.cat(p) for p in zip(*parts, strict=True))
        else:
            logits, final, escalated = cascade(runtime, x, probe, target, tau)
        if not return_info:
            return logits
        dense, executed, counts, level_masks = self._level_costs(*x.shape[-2:])
        final, escalated, probe = final.cpu(), escalated.cpu(), probe.cpu()
        masks = [m[final] for m in level_masks]
        if not self.levels:  # one dense variant: the network's own count (with its figures)
            return logits, ForwardInfo(plan, masks, [], model.macs(masks, *x.shape[-2:], batch=batch))
        spent = torch.where(escalated, executed[probe], 0)
        cost = Cost(dense, executed[final] + spent, spent, counts[final], list(self.totals))
        return logits, ForwardInfo(model.level_plan(plan, final.to(x.device)), masks, [], cost)


def engine_name(executor) -> str:
    """What an executor runs on: openvino or torch (variants), openvino-steps, or torch-compact."""
    return getattr(executor, "runtime_name", "torch-compact")


def executor_for(model: GatedNetwork, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 runtime: str = "auto", threads: int | None = None):
    """What serves a model: its variants on a runtime when it has them; else its steps'
    kernels compiled by OpenVINO where that is the runtime and its steps have them; else the
    torch compact executor (the model cast to `dtype`)."""
    modules = model.variants()
    if modules is not None:
        return VariantExecutor(model, runtime, dtype, device, threads, modules)
    device = torch.device(device)
    if pick_runtime(runtime, device) == "openvino" and has_kernels(model):
        precision = "bf16" if dtype == torch.bfloat16 else "f32"
        return StepwiseExecutor(model, precision, threads or torch.get_num_threads() or os.cpu_count())
    return CompactExecutor(model.to(dtype))
