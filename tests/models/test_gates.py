import pytest
import torch

from models.acs.gates import ACSGate, CheapGate, make_gate


@pytest.mark.parametrize("gate_cls", [ACSGate, CheapGate])
@pytest.mark.parametrize("size", [4, 8, 32, 57])
def test_scores_are_per_sample_in_unit_interval(gate_cls, size):
    gate = gate_cls(24, 32).eval()
    scores = gate(torch.randn(3, 24, size, size))
    assert scores.shape == (3, 32)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert not torch.allclose(scores[0], scores[1])


@pytest.mark.parametrize("gate_cls", [ACSGate, CheapGate])
@pytest.mark.parametrize("batch", [1, 3])
def test_reading_only_present_channels_gives_the_same_scores(gate_cls, batch):
    gate = gate_cls(24, 32).eval()
    x = torch.randn(batch, 24, 16, 16)
    present = torch.stack([torch.randperm(24)[:10].sort().values for _ in range(batch)])
    zeroed = torch.zeros_like(x)
    for b in range(batch):
        zeroed[b, present[b]] = x[b, present[b]]
    compact_input = torch.stack([x[b, present[b]] for b in range(batch)])
    assert torch.allclose(gate(compact_input, index=present), gate(zeroed), atol=1e-6)


def test_gate_macs_by_hand():
    gate = ACSGate(24, 32, hidden=16)
    # 1x1 at 16x16, two dense 3x3 DGConvs at 8x8, then the 16 -> 32 expansion.
    assert gate.macs(24, 16, 16) == 16 * 16 * 24 * 16 + 2 * 8 * 8 * 16 * 16 * 9 + 16 * 32
    assert CheapGate(24, 32).macs(10, 16, 16) == 10 * 32


def test_unknown_gate_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown gate"):
        make_gate("fancy", 8, 8)
    assert make_gate(None, 8, 8) is None
