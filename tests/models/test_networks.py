import threading

import pytest
import torch

from models.acs.dgconv import DGConv2d
from models.networks.densenet import acs_densenet40, densenet40
from models.networks.resnext import g_resnext29
from tests.conftest import randomize_bn


def test_too_small_or_malformed_inputs_are_clear_errors():
    model = densenet40().eval()
    assert model.min_input_size == 4
    model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="smaller than"):
        model(torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 1, 8, 8))


def test_any_num_classes():
    assert acs_densenet40(num_classes=3).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("factory", [acs_densenet40, g_resnext29])
def test_gradients_reach_gate_networks_and_dgconv_gates(factory):
    model = randomize_bn(factory()).train()  # not the zero-init residual BN: the mask matters
    logits, info = model(torch.randn(2, 3, 32, 32), budget=0.5, return_info=True)
    loss = logits.square().mean() + model.regularizer()
    loss.backward()
    first_gate = next(m.gate for m in model.modules() if getattr(m, "gate", None) is not None
                      and not isinstance(m, DGConv2d))
    assert first_gate.expand.weight.grad.abs().sum() > 0
    dg_gates = [m.gate.grad for m in model.modules() if isinstance(m, DGConv2d)]
    assert all(g is not None and g.abs().sum() > 0 for g in dg_gates)


def test_budget_is_per_call_not_module_state():
    """Threads calling one model with different budgets get the costs their budgets imply."""
    model = acs_densenet40().eval()
    x = torch.randn(1, 3, 32, 32)
    budgets = [0.2, 0.4, 0.6, 0.8, 1.0] * 2
    with torch.no_grad():
        expected = {b: model(x, budget=b, policy="topk", return_info=True)[1].cost.executed.item()
                    for b in set(budgets)}
    got, errors = {}, []

    def call(i, b):
        try:
            with torch.no_grad():
                got[i] = model(x, budget=b, policy="topk", return_info=True)[1].cost.executed.item()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i, b)) for i, b in enumerate(budgets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [got[i] for i in range(len(budgets))] == [expected[b] for b in budgets]
    assert len(set(expected.values())) == len(expected)


def test_dense_baseline_ignores_budget():
    model = densenet40().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full, info = model(x, budget=1.0, return_info=True)
        low = model(x, budget=0.1)
    assert torch.equal(full, low)
    assert model.floor() == 1.0
    assert info.cost.ratio.tolist() == [1.0, 1.0]
