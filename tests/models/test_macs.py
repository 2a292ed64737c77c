import torch

from models.networks.densenet import ACSDenseNet, DenseNetConfig
from models.networks.resnext import GResNeXt, ResNeXtConfig


def tiny_densenet():
    return ACSDenseNet(DenseNetConfig(num_classes=3, growth=2, bn_size=2, init_features=4,
                                      blocks=(1, 1), gate="cheap", input_size=8))


def test_tiny_densenet_by_hand():
    model = tiny_densenet()
    stem = 8 * 8 * 3 * 4 * 9
    dense = stem + (64 * 4 * 4 + 64 * 4 * 2 * 9) + 16 * 6 * 3 + (16 * 3 * 4 + 16 * 4 * 2 * 9) + 5 * 3
    masks = [torch.tensor([[True, False]]), torch.tensor([[False, False]])]
    cost = model.macs(masks, 8, 8)
    assert cost.dense == dense == 14191
    # layer 0: gate 4->2, 1x1 over 4 inputs, one 3x3 output; transition reads 5 channels;
    # layer 1: gate 3->2 and nothing else; classifier reads 3 channels.
    executed = stem + 4 * 2 + 64 * 4 * 4 + 64 * 4 * 1 * 9 + 16 * 5 * 3 + 3 * 2 + 3 * 3
    assert cost.executed.tolist() == [executed]
    assert cost.gates.tolist() == [4 * 2 + 3 * 2]
    assert cost.kept.tolist() == [[1, 0]]
    assert cost.skipped_ratio.tolist() == [0.75]
    assert cost.layer_skipped_ratio.tolist() == [[0.5, 1.0]]


def test_tiny_resnext_by_hand():
    model = GResNeXt(ResNeXtConfig(num_classes=3, layers=(1, 1), widths=(4, 8), expansion=2,
                                   stem_channels=4, gate="cheap", input_size=8))
    with torch.no_grad():
        model.blocks[1].conv2.gate.copy_(torch.tensor([-1.0, 1.0, 1.0]))  # 2 groups of 4
    stem = 8 * 8 * 3 * 4 * 9
    block1 = 64 * 4 * 4 + 64 * 4 * 4 * 9 + 64 * 4 * 8 + 64 * 4 * 8
    block2 = 64 * 8 * 8 + 16 * 8 * 4 * 9 + 16 * 8 * 16 + 16 * 8 * 16
    masks = [torch.tensor([[1, 1, 0, 0]]).bool(), torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0]]).bool()]
    cost = model.macs(masks, 8, 8)
    assert cost.dense == stem + block1 + block2 + 16 * 3
    # Block 2's 3x3 runs 2 groups padded to the fuller group's 2 kept channels.
    executed = (stem + 4 * 4 + 64 * 4 * 2 + 64 * 2 * 2 * 9 + 64 * 2 * 8 + 64 * 4 * 8
                + 8 * 8 + 64 * 8 * 3 + 16 * 2 * 2 * 2 * 9 + 16 * 3 * 16 + 16 * 8 * 16 + 16 * 3)
    assert cost.executed.tolist() == [executed]
    assert cost.kept.tolist() == [[2, 3]]


def test_executed_macs_follow_the_masks_in_a_forward_pass():
    model = tiny_densenet().eval()
    with torch.no_grad():
        _, info = model(torch.randn(4, 3, 8, 8), budget=torch.tensor([0.0, 0.4, 0.7, 1.0]),
                        policy="topk", return_info=True)
    assert info.cost.executed.tolist() == model.macs(info.masks, 8, 8).executed.tolist()
    assert info.cost.executed.tolist() == sorted(info.cost.executed.tolist())
