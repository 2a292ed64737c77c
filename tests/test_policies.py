import pytest
import torch

from models.acs.dgconv import DGConv2d
from models.core.budget import BudgetPlan, CalibrationTable
from models.networks.densenet import acs_densenet40
from models.networks.resnext import g_resnext29
from tests.conftest import randomize_bn


def grouped_resnext():
    """A G-ResNeXt whose DGConvs run with 4 groups, so policies act per group."""
    model = randomize_bn(g_resnext29(gate="cheap"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DGConv2d) and m.channels >= 64:
                m.gate[:2] = -1.0
    return model.eval()


MODELS = {"densenet": lambda: randomize_bn(acs_densenet40()).eval(), "resnext": grouped_resnext}
BUDGETS = [0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model, x, budget, policy):
    with torch.no_grad():
        return model(x, budget=budget, policy=policy, return_info=True)[1]


def test_table_is_monotone_and_starts_at_the_floor(model):
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
def test_cost_is_monotone_in_the_budget(model, images, policy):
    costs = [run(model, images, b, policy).cost.executed.double().mean().item() for b in BUDGETS]
    assert costs == sorted(costs)
    assert costs[-1] > costs[0]


def test_topk_cost_is_exact_and_within_budget(model, images):
    for b in BUDGETS:
        info = run(model, images, b, "topk")
        executed = info.cost.executed
        assert (executed == executed[0]).all()  # the same cost whatever the input
        counts = model.table.layer_counts(info.plan.effective[:1])[0].tolist()
        assert executed[0] == model.count_cost(counts).executed[0]
        assert info.cost.ratio[0] <= max(b, model.floor()) + 1e-9


def test_cap_never_exceeds_the_budget_per_request(model, images):
    budgets = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(3))
    for scale in (1.0, 0.6, 0.3):
        info = run(model, images, budgets * scale, "cap")
        limit = torch.clamp(budgets * scale, min=model.floor()).double()
        assert (info.cost.ratio <= limit + 1e-9).all()
        threshold = run(model, images, budgets * scale, "threshold")
        assert (info.cost.executed <= threshold.cost.executed).all()


def test_cap_keeps_the_best_scores(model, images):
    with torch.no_grad():
        _, info = model(images, budget=0.4, policy="cap", return_info=True)
    for mask, scores in zip(info.masks, info.scores, strict=True):
        kept = mask > 0
        for b in range(images.shape[0]):
            if kept[b].any() and (~kept[b]).any() and model.gated_groups() == [1] * len(info.masks):
                assert scores[b][kept[b]].min() >= scores[b][~kept[b]].max()


def test_budget_below_the_floor_is_clamped_and_reported(model, images):
    info = run(model, images[:2], 0.0, "topk")
    assert info.plan.requested.tolist() == [0.0, 0.0]
    assert info.plan.effective.tolist() == pytest.approx([model.floor()] * 2)


def test_per_sample_budgets(model, images):
    budgets = torch.tensor([0.2, 1.0, 0.5, 0.2, 1.0, 0.5])
    info = run(model, images, budgets, "topk")
    executed = info.cost.executed
    assert executed[0] == executed[3] < executed[2] == executed[5] < executed[1] == executed[4]


def test_grid_budgets_in_float32_pick_their_own_row():
    table = CalibrationTable([0.1, 0.6, 0.7, 1.0], [0.9, 0.4, 0.3, 0.0], [[1], [6], [7], [10]], 0.1)
    budgets = torch.tensor([0.7, 0.65, 0.1, 0.35, 1.0], dtype=torch.float32)
    assert table.layer_counts(budgets).flatten().tolist() == [7, 6, 1, 1, 10]


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), [0.5, 0.5, 0.5]])
def test_invalid_budgets_are_clear_errors(bad):
    model = acs_densenet40().eval()
    with pytest.raises(ValueError, match="budget"):
        model(torch.randn(2, 3, 32, 32), budget=torch.tensor(bad))


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy"):
        BudgetPlan.resolve(acs_densenet40().table, 0.5, "greedy", 1, torch.device("cpu"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(budgets=[0.5, 0.4], taus=[0.5, 0.4], counts=[[1], [2]]), "increasing"),
    (dict(budgets=[0.4, 0.5], taus=[0.4, 0.5], counts=[[1], [2]]), "tau"),
    (dict(budgets=[0.4, 0.5], taus=[0.5, 0.4], counts=[[2], [1]]), "counts"),
])
def test_non_monotone_tables_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationTable(floor=0.2, **kwargs)
