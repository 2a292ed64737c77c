import pytest
import torch

from models.core.budget import TAU_CLOSED, BudgetPlan, CalibrationTable
from models.networks.densenet import acs_densenet40


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


@pytest.mark.parametrize("policy", ["threshold", "cap", "topk"])
def test_the_floor_closes_every_gate_even_saturated_ones(policy):
    """Gates whose score is exactly 1.0 pass tau = 1.0: the floor's threshold is above it."""
    model = acs_densenet40(gate="cheap", growth=8, init_features=16, blocks=(2, 2)).eval()
    with torch.no_grad():
        for layer in model.layers():
            layer.gate.fc.bias.fill_(50.0)  # sigmoid: exactly 1.0 in float32
    assert model.table.taus[0] == TAU_CLOSED
    _, info = model(torch.randn(2, 3, 32, 32), budget=0.0, policy=policy, return_info=True)
    assert info.cost.ratio.tolist() == pytest.approx([model.floor()] * 2)
