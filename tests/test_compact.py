import pytest
import torch

from models.acs.dgconv import DGConv2d
from models.core.registry import compact
from models.networks.densenet import acs_densenet40, densenet40
from models.networks.resnext import g_resnext29
from tests.conftest import randomize_bn
from tests.dynamic_helpers import assert_compact_matches


def grouped(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DGConv2d) and m.channels >= 64:
                m.gate[:2] = -1.0  # 4 groups
    return model


MODELS = {
    "acs_densenet40": lambda: acs_densenet40(),
    "acs_densenet40_cheap": lambda: acs_densenet40(gate="cheap"),
    "densenet40": lambda: densenet40(),
    "g_resnext29": lambda: g_resnext29(),
    "g_resnext29_grouped_cheap": lambda: grouped(g_resnext29(gate="cheap")),
    "g_resnext29_dense": lambda: grouped(g_resnext29(gate=None)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[request.param]()).eval()
    return model, compact(model)


@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, "mixed"])
def test_compact_equals_masked_reference(pair, policy, batch, budget):
    model, executor = pair
    x = torch.randn(batch, 3, 32, 32)
    if budget == "mixed":
        budget = torch.linspace(0.1, 1.0, batch)
    assert_compact_matches(model, executor, x, budget, policy)


def test_per_sample_mode_equals_batched(pair):
    model, executor = pair
    x = torch.randn(4, 3, 40, 40)
    budget = torch.tensor([0.3, 0.9, 0.3, 0.6])
    for policy in ("threshold", "topk"):
        batched = executor(x, budget=budget, policy=policy)
        alone = executor(x, budget=budget, policy=policy, per_sample=True)
        assert torch.allclose(batched, alone, atol=1e-4)


def test_compact_executes_fewer_macs_at_lower_budgets():
    model = randomize_bn(acs_densenet40(gate="cheap")).eval()
    executor = compact(model)
    x = torch.randn(2, 3, 32, 32)
    costs = [executor(x, budget=b, policy="topk", return_info=True)[1].cost.ratio[0].item()
             for b in (1.0, 0.5, 0.25)]
    assert costs[0] > costs[1] > costs[2]
    assert costs[1] <= 0.5 and costs[2] <= 0.25
