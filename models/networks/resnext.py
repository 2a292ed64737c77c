"""G-ResNeXt with ACS gates: bottlenecks whose 3x3 convolution is a DGConv2d (learned groups),
each gated on its bottleneck width.

A skipped width channel removes MACs in all three convolutions: its row of the first 1x1,
its row and column of the 3x3, and its column of the last 1x1. A block with every channel
skipped reduces to its shortcut plus a constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.dgconv import DGConv2d
from ..acs.gates import make_gate
from ..core.base import GatedNetwork
from ..core.budget import BudgetPlan
from ..core.macs import Cost, conv_out, kept_counts
from ..core.registry import register_model


@dataclass(frozen=True)
class ResNeXtConfig:
    """Architecture of a G-ResNeXt; gate None gives the dense baseline."""

    num_classes: int = 10
    layers: tuple[int, ...] = (3, 3, 3)
    widths: tuple[int, ...] = (64, 128, 256)
    expansion: int = 2
    stem: str = "cifar"
    stem_channels: int = 64
    gate: str | None = "acs"
    input_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


class GBottleneck(nn.Module):
    """1x1 -> DGConv 3x3 (stride) -> 1x1, BN after each, residual; gated on the width."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int,
                 gate: str | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = DGConv2d(width, width, 3, stride=stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.gate = make_gate(gate, in_channels, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = 1.0 if mask is None else mask[:, :, None, None]
        h = F.relu(self.bn1(self.conv1(x))) * m
        h = F.relu(self.bn2(self.conv2(h))) * m
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.bn3(self.conv3(h)) + identity)


class GResNeXt(GatedNetwork):
    architecture = "resnext"
    config_class = ResNeXtConfig
    executor = "resnext_compact.CompactResNeXt"

    def __init__(self, config: ResNeXtConfig) -> None:
        super().__init__()
        if config.stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {config.stem!r}; expected 'cifar' or 'imagenet'")
        self.config = config
        self.input_size = config.input_size
        c = config.stem_channels
        if config.stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        blocks = []
        for i, (depth, width) in enumerate(zip(config.layers, config.widths, strict=True)):
            out = width * config.expansion
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(GBottleneck(c, width, out, stride, config.gate))
                c = out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.blocks:
            nn.init.zeros_(block.bn3.weight)

    def gated_totals(self) -> list[int]:
        return [b.conv2.channels for b in self.blocks if b.gate is not None]

    def gated_groups(self) -> list[int]:
        return [b.conv2.groups() for b in self.blocks if b.gate is not None]

    def run(self, x: torch.Tensor, plan: BudgetPlan):
        masks, scores = [], []
        h = self.stem(x)
        for block in self.blocks:
            mask = None
            if block.gate is not None:
                s = block.gate(h)
                mask = self.straight_through(plan.select(len(masks), s, block.conv2.groups()), s)
                masks.append(mask)
                scores.append(s)
            h = block(h, mask)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)), masks, scores

    def stem_macs(self, height: int, width: int) -> tuple[int, int, int]:
        """(MACs, output height, output width) of the stem."""
        conv = self.stem[0]
        h = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        w = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        macs = h * w * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 2
        if self.config.stem == "imagenet":
            h, w = conv_out(h, 2), conv_out(w, 2)
        return macs, h, w

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1) -> Cost:
        batch = masks[0].shape[0] if masks else batch
        device = masks[0].device if masks else None
        kept = kept_counts(masks, batch, device)
        stem, h, w = self.stem_macs(height, width)
        executed = torch.full((batch,), stem, dtype=torch.long, device=device)
        gates = torch.zeros_like(executed)
        dense = stem
        gated = 0
        for block in self.blocks:
            conv2 = block.conv2
            stride = conv2.stride
            ho, wo = conv_out(h, stride), conv_out(w, stride)
            cin, width_, cout = block.conv1.in_channels, conv2.channels, block.conv3.out_channels
            groups = conv2.groups()
            short = ho * wo * cin * cout if block.shortcut is not None else 0
            dense += h * w * cin * width_ + ho * wo * conv2.macs_per_pixel() + ho * wo * width_ * cout
            dense += short
            if block.gate is None:
                k = torch.full_like(executed, width_)
                cmax = torch.full_like(executed, width_ // groups)
            else:
                m = masks[gated] > 0
                k = kept[:, gated]
                cmax = m.reshape(batch, groups, -1).sum(-1).amax(-1)
                gated += 1
                g = torch.full_like(executed, block.gate.macs(cin, h, w))
                gates += g
                executed += g
            executed += h * w * cin * k + ho * wo * groups * cmax * cmax * 9 + ho * wo * k * cout
            executed += short
            h, w = ho, wo
        dense += self.fc.in_features * self.fc.out_features
        executed += self.fc.in_features * self.fc.out_features
        return Cost(dense, executed, gates, kept, self.gated_totals())


IMAGENET_SMOKE = {  # a small instance of the ImageNet layout, for the contract tests
    "layers": (1, 1, 1, 1), "widths": (16, 16, 32, 32), "stem_channels": 16, "input_size": 64,
}


@register_model(GResNeXt, smoke={"layers": (1, 1, 1), "widths": (16, 32, 64), "stem_channels": 16})
def g_resnext29(num_classes: int = 10, gate: str | None = "acs", **kwargs) -> GResNeXt:
    """CIFAR-size G-ResNeXt: 3 stages of 3 bottlenecks, widths 64/128/256, 3x3 stem."""
    return GResNeXt(ResNeXtConfig(num_classes=num_classes, gate=gate, **kwargs))


@register_model(GResNeXt, smoke=IMAGENET_SMOKE)
def g_resnext50(num_classes: int = 1000, gate: str | None = "acs", **kwargs) -> GResNeXt:
    """ImageNet-size G-ResNeXt-50 (ResNeXt-50 32x4d widths, DGConv learns the groups)."""
    cfg = dict(layers=(3, 4, 6, 3), widths=(128, 256, 512, 1024), stem="imagenet",
               input_size=224)
    return GResNeXt(ResNeXtConfig(num_classes=num_classes, gate=gate, **{**cfg, **kwargs}))


@register_model(GResNeXt, smoke=IMAGENET_SMOKE)
def g_resnext101(num_classes: int = 1000, gate: str | None = "acs", **kwargs) -> GResNeXt:
    """ImageNet-size G-ResNeXt-101."""
    return g_resnext50(num_classes, gate, **{"layers": (3, 4, 23, 3), **kwargs})
