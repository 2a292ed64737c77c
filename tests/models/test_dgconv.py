import pytest
import torch
import torch.nn.functional as F

from models.acs.dgconv import DGConv2d, kron_mask


def set_gates(conv: DGConv2d, bits: list[int]) -> DGConv2d:
    with torch.no_grad():
        conv.gate.copy_(torch.tensor([1.0 if b else -1.0 for b in bits]))
    return conv


def test_kron_mask_algebra():
    eye, ones = torch.eye(2), torch.ones(2, 2)
    g = torch.tensor([0.0, 1.0, 0.0])
    expected = torch.kron(torch.kron(eye, ones), eye)
    assert torch.equal(kron_mask(g), expected)
    assert torch.equal(kron_mask(torch.zeros(3)), torch.eye(8))
    assert torch.equal(kron_mask(torch.ones(3)), torch.ones(8, 8))


@pytest.mark.parametrize("bits", [[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
def test_sorted_mask_is_block_diagonal_with_regularizer_equal_to_nonzeros(bits):
    conv = set_gates(DGConv2d(16, 16), bits)
    u = conv.mask()
    size = 2 ** sum(bits)
    groups = 16 // size
    assert conv.groups() == groups
    assert torch.equal(u, torch.kron(torch.eye(groups), torch.ones(size, size)))
    assert conv.regularizer().item() == u.count_nonzero().item() == 2 ** (4 + sum(bits))


def test_unsorted_mask_follows_gate_order():
    conv = set_gates(DGConv2d(8, 8, sort=False), [1, 0, 0])
    assert torch.equal(conv.mask(), kron_mask(torch.tensor([1.0, 0.0, 0.0])))
    assert conv.groups() == 1


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_eval_grouped_convolution_equals_masked_weight(sort, stride):
    conv = set_gates(DGConv2d(16, 16, stride=stride, sort=sort), [0, 1, 0, 1])
    x = torch.randn(2, 16, 9, 9)
    expected = F.conv2d(x, conv.weight * conv.mask()[:, :, None, None], stride=stride, padding=1)
    conv.train()
    assert torch.allclose(conv(x), expected, atol=1e-5)
    conv.eval()
    weight, groups = conv.grouped_weight()
    assert groups == (4 if sort else 1)
    assert weight.shape == (16, 16 // groups, 3, 3)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert conv.grouped_weight()[0] is weight  # folded once and cached


def test_grouping_removes_macs():
    dense = set_gates(DGConv2d(16, 16), [1, 1, 1, 1])
    grouped = set_gates(DGConv2d(16, 16), [0, 0, 1, 1])
    assert grouped.macs_per_pixel() * 4 == dense.macs_per_pixel() == 16 * 16 * 9


def test_gradients_reach_gates_through_the_straight_through_estimator():
    conv = set_gates(DGConv2d(8, 8), [1, 0, 1])
    x = torch.randn(2, 8, 6, 6)
    (conv(x).square().mean() + conv.regularizer() / 64).backward()
    assert conv.gate.grad is not None
    assert conv.gate.grad.abs().sum() > 0
    assert conv.weight.grad.abs().sum() > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="power-of-two"):
        DGConv2d(12, 12)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        DGConv2d(16, 32)
