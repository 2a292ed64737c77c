"""The contract every registered model keeps, checked on a small instance of each
(`register_model(..., smoke=...)`): a new network is covered by registering it, as the
example network of docs/architecture.md (`models/networks/tiny.py`) is.

Forward at several sizes and batch sizes; the compact executor equal to the masked
reference, batched or per sample; dense MACs equal to fvcore's count; executed MACs
consistent with the masks; the checkpoint round trip; the policies' guarantees (a monotone
table from the floor, topk exact, cap never over and keeping the best scores). Every model
runs with trained-looking BN statistics and learned DGConv groups (4 groups where a DGConv
has 16 channels or more), so BN folding and grouped execution are exercised.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from models.acs.dgconv import DGConv2d
from models.core.checkpoint import load_checkpoint, save_checkpoint
from models.core.registry import MODELS, create_model, describe, model_names, register_model
from models.engines.compact import compact
from tests.dynamic_helpers import (
    assert_compact_matches,
    fvcore_macs,
    infer,
    precision_pairs,
    randomize_all_bn,
)

NAMES = model_names()
# Registered models with other gate kinds, also held to the contract: name -> (model, overrides)
VARIANTS = {
    "acs_densenet40_cheap": ("acs_densenet40", {"gate": "cheap"}),
    "g_resnext29_cheap": ("g_resnext29", {"gate": "cheap"}),
    "g_resnext29_dense": ("g_resnext29", {"gate": None}),
    "acs_fastnet_acs": ("acs_fastnet", {"gate": "acs"}),
    "tiny_net_acs": ("tiny_net", {"gate": "acs"}),
    "tiny_net_dense": ("tiny_net", {"gate": None}),
}
CASES = {**{name: (name, {}) for name in NAMES}, **VARIANTS}
BUDGETS = [1.0, 0.5, 0.25, 0.0]


def small(name: str, **overrides):
    """A small instance of a registered model with trained-looking BN and DGConv groups."""
    torch.manual_seed(0)
    model = randomize_all_bn(create_model(name, **{**MODELS[name].smoke, **overrides}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DGConv2d) and m.channels >= 16:
                m.gate[:2] = -1.0  # 4 groups
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pairs(request) -> dict:
    """float32 and float64 (model, compact executor) pairs of one case."""
    name, overrides = CASES[request.param]
    return precision_pairs(small(name, **overrides))


@pytest.fixture(scope="module")
def pair(pairs):
    return pairs[torch.float32]


def images(model, batch: int, scale: int = 1) -> torch.Tensor:
    size = model.input_size * scale
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def test_every_model_is_registered_with_its_network_and_config_and_runs_compact_from_its_units():
    assert {"acs_densenet40", "densenet40", "g_resnext29", "acs_fastnet", "fastnet", "tiny_net"} <= set(NAMES)
    for name in NAMES:
        record = MODELS[name]
        model = small(name)
        assert type(model) is record.network
        assert isinstance(model.config, record.config)
        assert describe(model) == (record.architecture, model.config.to_dict())
        gated_steps = [s for s in compact(model).steps if s.gate is not None]
        assert [s.gated_index for s in gated_steps] == list(range(len(model.gated_totals())))


def test_names_resolve_one_way():
    """Model names are factories, architecture names their config's defaults; models win."""
    assert not create_model("fastnet").gated  # the dense model, not the architecture's default
    assert create_model("acs_fastnet").gated
    model = create_model("densenet", growth=8, blocks=(1, 1))
    assert describe(model)[0] == "densenet" and model.config.gate == "acs"
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg")
    with pytest.raises(ValueError, match="registered twice"):
        register_model(MODELS["fastnet"].network)(MODELS["fastnet"].factory)


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_at_any_size_and_batch(pair, scale, batch):
    model, _ = pair
    logits, info = infer(model, images(model, batch, scale), 0.5)
    assert logits.shape == (batch, model.config.num_classes)
    assert torch.isfinite(logits).all()
    assert info.cost.executed.shape == (batch,)
    assert len(info.masks) == len(model.gated_totals())
    for mask, total in zip(info.masks, model.gated_totals(), strict=True):
        assert mask.shape == (batch, total)


@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (4, torch.float32), (5, torch.float64)])
@pytest.mark.parametrize("budget", BUDGETS + ["mixed"])
def test_compact_equals_masked_reference(pairs, policy, batch, dtype, budget):
    """Per-pixel or rounded decisions (channel gating, DFS) turn a last-bit difference between
    batched and single-sample kernels into another decision now and then: the float64 case
    holds a batch to exact equality."""
    model, executor = pairs[dtype]
    if budget == "mixed":
        budget = torch.linspace(0.2, 1.0, batch)
    assert_compact_matches(model, executor, images(model, batch).to(dtype), budget, policy)


def test_per_sample_mode_equals_batched(pair):
    model, executor = pair
    x = images(model, 4, scale=2)
    budget = torch.tensor([0.3, 0.9, 0.3, 0.6])
    for policy in ("threshold", "topk"):
        batched = executor(x, budget=budget, policy=policy)
        alone = executor(x, budget=budget, policy=policy, per_sample=True)
        assert torch.allclose(batched, alone, atol=1e-4)


@pytest.mark.parametrize("scale", [1, 1.5])
def test_dense_macs_match_fvcore(pair, scale):
    model, _ = pair
    size = int(model.input_size * scale)
    cost = model.macs([torch.ones(1, t, dtype=torch.bool) for t in model.gated_totals()], size, size)
    assert cost.dense + cost.gates[0] == fvcore_macs(model, size)


def test_executed_macs_follow_the_masks(pair):
    """Keeping every channel executes the dense MACs plus the gates', the floor's counts cost
    the floor, and dropping channels never costs more."""
    model, _ = pair
    totals, size = model.gated_totals(), model.input_size
    full = model.macs([torch.ones(1, t, dtype=torch.bool) for t in totals], size, size)
    assert full.executed[0] == full.dense + full.gates[0]
    none = model.macs([torch.zeros(1, t, dtype=torch.bool) for t in totals], size, size)
    floor_counts = model.table.counts[0]  # what a request at the floor keeps
    assert model.count_cost(floor_counts).executed[0] >= none.executed[0]
    assert float(model.budget_ratio(model.count_cost(floor_counts))[0]) == pytest.approx(model.floor())
    g = torch.Generator().manual_seed(0)
    half = [torch.rand(1, t, generator=g) < 0.5 for t in totals]
    some = model.macs(half, size, size)
    assert none.executed[0] <= some.executed[0] <= full.executed[0]
    assert some.kept[0].tolist() == [int(m.sum()) for m in half]


def test_checkpoint_round_trip(pair, tmp_path):
    model, _ = pair
    path = tmp_path / "model"
    save_checkpoint(model, path, name="model", classes=[f"c{i}" for i in range(model.config.num_classes)])
    loaded = load_checkpoint(path)
    x = images(model, 2)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, budget=0.5), model(x, budget=0.5))
    assert describe(loaded.model) == describe(model)
    assert loaded.model.table == model.table


def test_table_is_monotone_and_starts_at_the_floor(pair):
    model, _ = pair
    table = model.table
    assert table.budgets[0] == pytest.approx(model.floor())
    assert table.budgets[-1] == 1.0
    taus = table.tau(torch.linspace(0, 1, 101))
    assert (taus[1:] <= taus[:-1]).all()
    counts = table.layer_counts(torch.linspace(0, 1, 101))
    assert (counts[1:] >= counts[:-1]).all()
    for row in table.counts:
        assert all(c % g == 0 for c, g in zip(row, model.gated_groups(), strict=True))


@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
def test_cost_is_monotone_in_the_budget(pair, policy):
    model, _ = pair
    x = images(model, 4)
    costs = [infer(model, x, b, policy)[1].cost.executed.double().mean().item()
             for b in (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)]
    assert costs == sorted(costs)
    assert costs[-1] > costs[0] or not model.gated


def test_budget_below_the_floor_is_clamped_and_reported(pair):
    model, _ = pair
    _, info = infer(model, images(model, 2), 0.0, "topk")
    assert info.plan.requested.tolist() == [0.0, 0.0]
    assert info.plan.effective.tolist() == pytest.approx([model.floor()] * 2)


def test_topk_is_exact_and_within_budget(pair):
    model, _ = pair
    x = images(model, 4)
    for b in BUDGETS:
        _, info = infer(model, x, b, "topk")
        executed = info.cost.executed
        assert (executed == executed[0]).all()  # the same cost whatever the input
        counts = model.table.layer_counts(info.plan.effective[:1])[0].tolist()
        assert executed[0] == model.count_cost(counts).executed[0]
        assert float(model.budget_ratio(info.cost)[0]) <= max(b, model.floor()) + 1e-9


def test_cap_never_exceeds_the_budget(pair):
    model, _ = pair
    x = images(model, 4)
    budgets = torch.rand(4, generator=torch.Generator().manual_seed(3))
    for scale in (1.0, 0.6, 0.3):
        _, info = infer(model, x, budgets * scale, "cap")
        limit = torch.clamp(budgets * scale, min=model.floor()).double()
        assert (model.budget_ratio(info.cost).double() <= limit + 1e-6).all()
        _, threshold = infer(model, x, budgets * scale, "threshold")
        assert (info.cost.executed <= threshold.cost.executed).all()


def test_cap_keeps_the_best_scores(pair):
    model, _ = pair
    x = images(model, 4)
    _, info = infer(model, x, 0.4, "cap")
    for mask, scores, groups in zip(info.masks, info.scores, model.gated_groups(), strict=True):
        kept = (mask > 0).reshape(mask.shape[0], groups, -1)
        scores = scores.reshape(kept.shape)
        for b, g in itertools.product(range(kept.shape[0]), range(groups)):
            if kept[b, g].any() and (~kept[b, g]).any():
                assert scores[b, g][kept[b, g]].min() >= scores[b, g][~kept[b, g]].max()


def test_the_architecture_guide_quotes_the_example_network_whole():
    guide = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    source = (Path(__file__).parents[2] / "models" / "networks" / "tiny.py").read_text()
    assert "```python\n" + source + "```" in guide
