"""Shared helpers of the tests of the other dynamic methods (slimmable, channel gating, DFS)."""

from __future__ import annotations

import copy
from dataclasses import fields

import torch
from fvcore.nn import FlopCountAnalysis

from models.core.macs import Cost
from models.networks.slimmable import SwitchableBatchNorm2d
from tests.conftest import randomize_bn


def precision_pairs(model) -> dict:
    """float32 and float64 (model, compact executor) pairs of one model."""
    from models.engines.compact import compact

    double = copy.deepcopy(model).double()
    return {torch.float32: (model, compact(model)), torch.float64: (double, compact(double))}


def sample_images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def fvcore_macs(model, size: int) -> int:
    """Convolution and linear MACs counted by fvcore (one 'flop' per MAC), at budget 1.0."""
    counter = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = counter.by_operator()
    return by_op.get("conv", 0) + by_op.get("linear", 0)


def randomize_all_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """randomize_bn, plus independent statistics for every width level of switchable BNs."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SwitchableBatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def infer(model, x, budget, policy="threshold"):
    with torch.no_grad():
        return model(x, budget=budget, policy=policy, return_info=True)


def union_pass(executor, x, policy) -> bool:
    """Whether the executor runs this batch as one pass over the union of its keeps."""
    return policy == "threshold" and x.shape[0] > 1 and any(s.zero for s in executor.steps)


def assert_compact_matches(model, executor, x, budget, policy, atol=1e-4):
    """Compact == masked reference: logits, masks, executed MACs and a method's own cost figures
    (a batch run as one pass over the union of its keeps reports the union for every sample,
    and its MACs)."""
    expected, ref = infer(model, x, budget, policy)
    logits, info = executor(x, budget=budget, policy=policy, return_info=True)
    assert torch.allclose(logits, expected, atol=atol, rtol=atol), (logits - expected).abs().max()
    assert len(info.masks) == len(ref.masks)
    want_masks = [m > 0 for m in ref.masks]
    if union_pass(executor, x, policy):
        want_masks = [m.any(0, keepdim=True).expand_as(m) for m in want_masks]
    for got, want in zip(info.masks, want_masks, strict=True):
        assert torch.equal(got, want)
    want_cost = model.macs(want_masks, *x.shape[-2:], batch=x.shape[0])
    assert torch.equal(info.cost.executed, want_cost.executed)
    if not union_pass(executor, x, policy):  # a method's own figures (BitOps, per-pixel MACs)
        for field in fields(ref.cost):
            if field.name not in {f.name for f in fields(Cost)}:
                want, got = getattr(ref.cost, field.name), getattr(info.cost, field.name)
                assert torch.equal(want, got) if torch.is_tensor(want) else want == got, field.name
    return ref.cost, info.cost


def run_with_skipped_parts_failing(model, monkeypatch, parts, attribute: str):
    """Run the compact executor at budget 0 (topk: every gated part skipped) with `attribute`
    of every part made to raise: skipped work is never computed. Returns the cost."""
    from models.engines.compact import compact

    def fail(*args, **kwargs):
        raise AssertionError(f"{attribute} of a skipped part was computed")

    for part in parts:
        monkeypatch.setattr(part, attribute, fail)
    logits, info = compact(model)(torch.randn(2, 3, 32, 32), budget=0.0, policy="topk", return_info=True)
    assert (info.cost.kept == 0).all() and torch.isfinite(logits).all()
    return info.cost
