"""Width-level networks and their engines: the ranked FastNet's variants, the confidence
cascade (threshold, cap, topk), its calibration, and the variant executor on torch and
OpenVINO against the masked reference."""

import copy

import pytest
import torch

from models.core.budget import CalibrationTable
from models.core.registry import create_model
from models.engines.variants import (
    VariantExecutor,
    engine_name,
    executor_for,
    openvino_available,
    pick_runtime,
)
from tests.conftest import randomize_bn
from training.calibrate import NEVER_TAU, fit_cascade, level_logits

pytestmark = pytest.mark.models
RUNTIMES = ["torch"] + (["openvino"] if openvino_available() else [])


def ranked(cascade: list | None = None):
    """A small ranked FastNet (4 levels) with trained-looking BN; with cascade rows if given."""
    torch.manual_seed(0)
    model = randomize_bn(create_model("acs_ranked_fastnet", widths=(32, 64, 64),
                                      levels=(0.25, 0.5, 0.75, 1.0))).eval()
    if cascade is not None:
        table = model.uniform_table()
        model.table = CalibrationTable(table.budgets, table.taus, table.counts, table.floor, "cascade",
                                       {"cascade": cascade})
    return model


def ratios(model) -> list[float]:
    return model.level_costs(model.input_size, model.input_size)[1]


def images(batch: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def median_tau(model, x: torch.Tensor, level: int = 0) -> float:
    """An uncertainty threshold that escalates about half of x from `level`: the midpoint of the
    widest gap between the middle uncertainties (a runtime's rounding flips no decision)."""
    with torch.no_grad():
        u = (1 - model.variant(level)(x).softmax(1).amax(1)).sort().values
    n = len(u)
    i = max(range(n // 4, 3 * n // 4), key=lambda j: u[j + 1] - u[j])
    return float(u[i] + u[i + 1]) / 2


def cascade_rows(model, tau: float) -> list:
    """Rows from the floor: probe the narrowest level, escalate to the widest."""
    return [[model.table.floor, 0, model.num_levels - 1, tau], [1.0, model.num_levels - 1,
                                                              model.num_levels - 1, NEVER_TAU]]


def test_a_level_is_the_masked_network_at_its_prefixes():
    model = ranked()
    x = images(4)
    for level in range(model.num_levels):
        b = torch.full((4,), ratios(model)[level])
        with torch.no_grad():
            expected = model(x, budget=b, policy="topk")
            assert torch.allclose(model.variant(level)(x), expected, atol=1e-5)


def test_order_channels_keeps_the_dense_function_and_ranks_prefixes():
    model = ranked()
    x = images(4)
    with torch.no_grad():
        before = model(x, budget=1.0)
        model.order_channels()
        assert torch.allclose(model(x, budget=1.0), before, atol=1e-4)
    norms = model.convs[1].weight.transpose(0, 1).flatten(1).norm(dim=1)  # what reads layer 0
    assert (norms[:-1] >= norms[1:]).all()


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
def test_variant_executor_equals_the_masked_reference(runtime, policy):
    model = ranked()
    x = images(16)
    rows = [[model.table.floor, 0, 3, median_tau(model, x)], [0.5, 1, 3, median_tau(model, x, 1)],
            [1.0, 3, 3, NEVER_TAU]]
    model.table = CalibrationTable(**{**model.uniform_table().to_dict(), "extra": {
        "cascade": {"threshold": rows, "cap": rows}}})
    budget = torch.linspace(0.1, 1.0, 16)
    with torch.no_grad():
        expected, ref = model(x, budget=budget, policy=policy, return_info=True)
    executor = VariantExecutor(model, runtime)
    logits, info = executor(x, budget=budget, policy=policy, return_info=True)
    # OpenVINO computes in its own order (float32): the same decisions, logits within 1e-3
    assert torch.allclose(logits, expected, atol=1e-4 if runtime == "torch" else 1e-3)
    assert torch.equal(info.cost.executed, ref.cost.executed)
    assert torch.equal(info.cost.gates, ref.cost.gates)
    for got, want in zip(info.masks, ref.masks, strict=True):
        assert torch.equal(got, want > 0)
    alone = executor(x, budget=budget, policy=policy, per_sample=True)
    assert torch.allclose(alone, logits, atol=1e-4 if runtime == "torch" else 1e-3)


def test_threshold_escalates_the_uncertain_images_and_charges_the_probe():
    model = ranked()
    x = images(32)
    tau = median_tau(model, x)
    model.table = CalibrationTable(**{**model.uniform_table().to_dict(),
                                      "extra": {"cascade": {"threshold": cascade_rows(model, tau)}}})
    with torch.no_grad():
        probe = model.variant(0)(x).softmax(1)
    uncertain = 1 - probe.amax(1) >= tau
    assert 0 < uncertain.sum() < 32  # the test needs both kinds
    executor = VariantExecutor(model, "torch")
    _, info = executor(x, budget=0.5, policy="threshold", return_info=True)
    macs = model.level_costs(32, 32)[0]
    expected = torch.where(uncertain, macs[0] + macs[-1], macs[0])
    assert torch.equal(info.cost.executed, expected)
    assert torch.equal(info.cost.gates, torch.where(uncertain, macs[0], 0))
    assert torch.equal(info.cost.kept[:, -1] == model.gated_totals()[-1], uncertain)


def test_cap_never_exceeds_the_budget_and_topk_is_the_widest_level_within_it():
    model = ranked()
    x = images(32)
    data = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    logits = level_logits(model, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    u = 1 - logits[0].softmax(1).amax(1)
    # the narrowest level is right where it is confident, the widest elsewhere
    labels = torch.where(u < u.median(), logits[0].argmax(1), logits[-1].argmax(1))
    grid = [model.table.floor, *[b / 20 for b in range(2, 21)]]
    cap = fit_cascade(ratios(model), logits, labels, grid, cap=True)
    assert any(t > p for _, p, t, _ in cap)  # some budgets escalate
    model.table = CalibrationTable(**{**model.uniform_table().to_dict(), "extra": {
        "cascade": {"threshold": cascade_rows(model, median_tau(model, x)), "cap": cap}}})
    executor = VariantExecutor(model, "torch")
    for b in torch.linspace(0.0, 1.0, 21).tolist():
        _, info = executor(x, budget=b, policy="cap", return_info=True)
        assert (info.cost.ratio <= max(b, model.floor()) + 1e-9).all()
        _, topk = executor(x, budget=b, policy="topk", return_info=True)
        widest = max(i for i, r in enumerate([0.0, *ratios(model)]) if r <= max(b, model.floor()) + 1e-9)
        assert (topk.cost.ratio == ratios(model)[widest - 1]).all()


def test_fit_cascade_tracks_each_budget_with_the_best_pair():
    """Synthetic levels: the narrow one is right when it is confident; the cascade spends the
    budget on average and beats the widest level within it."""
    g = torch.Generator().manual_seed(0)
    n, classes = 2000, 10
    labels = torch.randint(0, classes, (n,), generator=g)
    confident = torch.rand(n, generator=g) < 0.6
    narrow = torch.randn(n, classes, generator=g)
    narrow[confident, labels[confident]] += 8  # confident and right
    wide = torch.randn(n, classes, generator=g)
    wide[torch.arange(n), labels] += 4
    logits = torch.stack([narrow, wide, wide + 0.01 * torch.randn(n, classes, generator=g)])
    costs = [0.1, 0.5, 1.0]
    rows = fit_cascade(costs, logits, labels, [0.1, 0.3, 0.6, 1.0])
    assert rows[0][1:3] == [0, 0]  # only the narrowest level fits
    for b, p, t, _ in fit_cascade(costs, logits, labels, [0.3, 0.6, 0.9], cap=True):
        assert costs[p] + (costs[t] if t > p else 0) <= b
    assert rows[-1] == [1.0, 2, 2, NEVER_TAU]  # the full budget runs the full network
    for b, p, t, tau in rows[1:-1]:
        u = 1 - logits[p].softmax(1).amax(1)
        escalated = u >= tau
        mean = costs[p] + escalated.double().mean().item() * costs[t]
        assert b - 0.01 <= mean <= b + 1e-9
        final = torch.where(escalated, logits[t].argmax(1), logits[p].argmax(1))
        widest = max(i for i, c in enumerate(costs) if c <= b)
        assert (final == labels).double().mean() > (logits[widest].argmax(1) == labels).double().mean()


def test_level_logits_are_the_variants():
    model = ranked()
    data = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = level_logits(model, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (model.num_levels, 8, 10)
    x = (data.float() / 255 - 0.5) / 0.25
    assert torch.allclose(out[2], model.variant(2)(x), atol=1e-5)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_dense_baseline_runs_as_one_variant(runtime):
    torch.manual_seed(0)
    model = randomize_bn(create_model("fastnet", widths=(16, 32, 32))).eval()
    x = images(8)
    executor = executor_for(copy.deepcopy(model), "cpu", torch.float32, runtime)
    assert engine_name(executor) == runtime
    logits, info = executor(x, budget=0.3, return_info=True)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(logits, expected, atol=1e-4 if runtime == "torch" else 1e-3)
    assert (info.cost.ratio == 1.0).all() and (info.cost.gates == 0).all()


def test_models_without_variants_run_compact_and_runtimes_are_checked():
    model = create_model("acs_fastnet", widths=(16, 32, 32)).eval()
    assert engine_name(executor_for(model)) == "torch-compact"
    with pytest.raises(ValueError, match="runtime must be one of"):
        pick_runtime("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs the CPU"):
        pick_runtime("openvino", torch.device("cuda"))
    assert pick_runtime("auto", torch.device("cuda")) == "torch"


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_openvino_bfloat16_keeps_the_decisions_of_float32():
    model = ranked()
    x = images(32)
    f32 = VariantExecutor(copy.deepcopy(model), "openvino", torch.float32)
    bf16 = VariantExecutor(copy.deepcopy(model), "openvino", torch.bfloat16)
    assert bf16.runtime.precision == "bf16"
    a, b = f32(x, budget=1.0, policy="topk"), bf16(x, budget=1.0, policy="topk")
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_a_bfloat16_executor_runs_other_sizes_on_its_torch_fallback():
    """OpenVINO compiles one image size; another size runs the torch variants, in the same
    precision (compiling must not leave them in another dtype)."""
    model = ranked()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    executor = VariantExecutor(copy.deepcopy(model), "openvino", torch.bfloat16)
    assert executor.runtime is not executor.fallback
    logits, info = executor(x, budget=1.0, policy="topk", return_info=True)
    with torch.no_grad():
        expected = model(x, budget=1.0, policy="topk")
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert torch.allclose(logits, expected, atol=0.1)
    assert (info.cost.ratio == 1.0).all()
