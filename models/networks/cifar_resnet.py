"""The CIFAR ResNet that the slimmable, channel-gating and DFS networks share: a 3x3 stem,
stages of basic blocks, a 1x1 projection shortcut where the shape changes, a linear head."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from ..core.units import ConvStem, LinearHead, Unit


def resnet_layout(blocks: tuple[int, ...], widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of every basic block of a CIFAR ResNet whose stem
    outputs widths[0] channels; the first block of every stage after the first has stride 2."""
    if len(blocks) != len(widths) or not blocks:
        raise ValueError(f"blocks {blocks} and widths {widths} must have one entry per stage")
    layout, c = [], widths[0]
    for i, (depth, width) in enumerate(zip(blocks, widths, strict=True)):
        for j in range(depth):
            layout.append((c, width, 2 if i > 0 and j == 0 else 1))
            c = width
    return layout


def build_resnet(net: nn.Module, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int,
                 block: Callable[[int, int, int], nn.Module], bn: Callable = nn.BatchNorm2d) -> None:
    """Give `net` a CIFAR ResNet's modules: `stem` (3x3 conv) and `stem_bn`, `blocks` (one
    `block(in_channels, out_channels, stride)` per basic block), `fc`; convolutions
    Kaiming-initialized (fan out)."""
    net.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    net.stem_bn = bn(widths[0])
    net.blocks = nn.ModuleList(block(cin, cout, stride)
                               for cin, cout, stride in resnet_layout(blocks, widths))
    net.fc = nn.Linear(widths[-1], num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet_units(net: nn.Module) -> list[Unit]:
    """The units of a CIFAR ResNet whose blocks are units: the stem (conv -> BN -> ReLU), the
    blocks, the linear head on the global average pool."""
    return [ConvStem(net.stem, ResNetStem(net.stem, net.stem_bn)), *net.blocks, LinearHead(net.fc)]


class ResNetStem(nn.Module):
    """conv -> BN -> ReLU, as a module."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))
