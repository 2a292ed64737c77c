"""The smallest complete network, the example of docs/architecture.md ("Adding a network"):
a stem, one gated 3x3 layer, a linear head. The contract suite holds it to every rule a
network keeps; it ships no weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import nn

from models.acs.gates import make_gate
from models.core.base import GatedNetwork
from models.core.folding import fold_conv_bn
from models.core.gather import conv_rows_gathered
from models.core.registry import register_model
from models.core.units import ConvStem, LinearHead, Step, Unit


@dataclass(frozen=True)
class TinyConfig:
    num_classes: int = 10
    width: int = 32
    gate: str | None = "cheap"  # "acs", "cheap", or None: the dense baseline
    input_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


class GatedConv(nn.Module, Unit):
    """3x3 conv -> BN -> ReLU, gated on its output channels by a gate reading its input."""

    def __init__(self, channels: int, gate: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.gate = make_gate(gate, channels, channels)

    def gated_layers(self):  # (channels, groups) of each gated layer it decides
        return [] if self.gate is None else [(self.conv.out_channels, 1)]

    def reference(self, state, trace):  # the masked forward; trace numbers the masks
        h = state["h"]
        out = F.relu(self.bn(self.conv(h)))
        if self.gate is not None:
            out = out * trace.mask(self.gate(h))[:, :, None, None]
        return {"h": out}

    def cost(self, tally):  # dense and executed MACs, gate MACs
        h, w = tally.size
        macs_per_channel = 9 * h * w * self.conv.in_channels
        if self.gate is None:
            return tally.add(macs_per_channel * self.conv.out_channels)
        kept = tally.kept[:, tally.next()]
        tally.add(macs_per_channel * self.conv.out_channels, macs_per_channel * kept,
                  self.gate.macs(self.conv.in_channels, h, w))

    def steps(self):  # compact: only the kept channels are computed
        weight, bias = fold_conv_bn(self.conv.weight, self.bn)

        def apply(state, keep):  # keep: None (all) or (B, C) with equal counts
            h = state["h"]
            if keep is None or keep.all():
                return {"h": F.relu(F.conv2d(h, weight, bias, padding=1))}
            out = h.new_zeros(h.shape[0], weight.shape[0], *h.shape[2:])
            rows = keep.nonzero()[:, 1].view(keep.shape[0], -1)
            if rows.shape[1] == 0:
                return {"h": out}
            kept = conv_rows_gathered(h, weight, rows, padding=1) + bias[rows][..., None, None]
            return {"h": out.scatter(1, rows[..., None, None].expand_as(kept), kept.relu())}

        gate = None if self.gate is None else (lambda state: self.gate(state["h"]))
        return [Step(apply, gate=gate)]


class TinyNet(GatedNetwork):
    architecture = "tiny"  # what a manifest stores
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config, self.input_size = config, config.input_size
        self.stem = nn.Conv2d(3, config.width, 3, padding=1, bias=False)
        self.layer = GatedConv(config.width, config.gate)
        self.fc = nn.Linear(config.width, config.num_classes)

    def units(self):
        return [ConvStem(self.stem, self.stem), self.layer, LinearHead(self.fc)]


@register_model(TinyNet, smoke={"width": 16})
def tiny_net(num_classes: int = 10, **kwargs) -> TinyNet:
    return TinyNet(TinyConfig(num_classes=num_classes, **kwargs))
