"""Gates: per-sample channel scores in [0, 1], evaluated before the computation they control.

A gate reads the raw input of the gated computation. Skipped channels of that input are
exact zeros, so in compact execution the gate reads only the channels present (`index`)
and its result is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import Gate
from ..core.gather import conv1x1_gathered, linear_gathered
from ..core.macs import conv_out
from .dgconv import DGConv2d


class ACSGate(Gate):
    """ACS-GN: 1x1 conv -> DGConv 3x3 s2 -> BN -> ReLU -> DGConv 3x3 -> GAP -> 1x1 -> sigmoid.

    Global average pooling makes it work at 32x32 and any larger (or smaller) input.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.dg1 = DGConv2d(hidden, hidden, 3, stride=2)
        self.bn = nn.BatchNorm2d(hidden)
        self.dg2 = DGConv2d(hidden, hidden, 3)
        self.expand = nn.Conv2d(hidden, out_channels, 1)
        nn.init.constant_(self.expand.bias, 1.0)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        h = conv1x1_gathered(x, self.reduce.weight[:, :, 0, 0], index)
        h = F.relu(self.bn(self.dg1(h)))
        h = self.dg2(h).mean((2, 3), keepdim=True)
        return torch.sigmoid(self.expand(h)).flatten(1)

    def macs(self, in_channels: int, height: int, width: int) -> int:
        """MACs for one sample reading `in_channels` channels of a height x width input."""
        hidden = self.reduce.out_channels
        pixels = conv_out(height, 2) * conv_out(width, 2)
        return (
            height * width * in_channels * hidden
            + pixels * (self.dg1.macs_per_pixel() + self.dg2.macs_per_pixel())
            + hidden * self.expand.out_channels
        )


class CheapGate(Gate):
    """FBS-style gate: global average pool -> fully connected -> sigmoid."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.constant_(self.fc.bias, 1.0)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(linear_gathered(x.mean((2, 3)), self.fc.weight, index, self.fc.bias))

    def macs(self, in_channels: int, height: int, width: int) -> int:
        return in_channels * self.fc.out_features


GATES = {"acs": ACSGate, "cheap": CheapGate}


def make_gate(kind: str | None, in_channels: int, out_channels: int) -> nn.Module | None:
    """A gate by name ('acs', 'cheap'), or None for an ungated (dense) network."""
    if kind is None:
        return None
    if kind not in GATES:
        raise ValueError(f"unknown gate {kind!r}; expected one of {sorted(GATES)} or None")
    return GATES[kind](in_channels, out_channels)
