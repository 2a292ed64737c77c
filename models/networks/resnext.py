"""G-ResNeXt with ACS gates: bottlenecks whose 3x3 convolution is a DGConv2d (learned groups),
each gated on its bottleneck width.

A skipped width channel removes MACs in all three convolutions: its row of the first 1x1,
its row and column of the 3x3, and its column of the last 1x1. A block with every channel
skipped reduces to its shortcut plus a constant.

Compact execution: per block, only the kept width channels run: the rows of the first 1x1,
the kept part of each DGConv group of the 3x3, and the columns of the last 1x1 (BN folded
into all three). The 3x3 runs as one grouped convolution whose groups are padded to the
fullest group's kept count (cmax); those padding MACs are counted as executed.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.dgconv import DGConv2d
from ..acs.gates import make_gate
from ..core.base import GatedNetwork
from ..core.folding import fold_conv_bn
from ..core.gather import conv1x1_gathered, gather_rows
from ..core.macs import conv_out
from ..core.registry import register_model
from ..core.units import ConvStem, LinearHead, Step, Tally, Trace, Unit


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


def group_slots(keep: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For keep (B, C) with equal counts: kept channels (B, k), their slots in the padded
    grouped layout (B, k), and the padded group size cmax."""
    b, c = keep.shape
    per_group = keep.reshape(b, groups, c // groups)
    cmax = int(per_group.sum(-1).amax())
    rank = per_group.cumsum(-1) - 1  # position of each kept channel within its group
    slot = rank + torch.arange(groups, device=keep.device)[:, None] * cmax
    rows = keep.nonzero()[:, 1].reshape(b, -1)
    return rows, slot.reshape(b, c).gather(1, rows), cmax


def group_key(groups: int, keep: torch.Tensor) -> torch.Tensor:
    """Samples with equal kept counts and equal fullest-group counts (cmax) run together."""
    b, c = keep.shape
    cmax = keep.reshape(b, groups, c // groups).sum(-1).amax(-1)
    return keep.sum(1) * (c + 1) + cmax


class GBottleneck(nn.Module, Unit):
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

    def gated_layers(self) -> list[tuple[int, int]]:
        return [] if self.gate is None else [(self.conv2.channels, self.conv2.groups())]

    def reference(self, state: dict, trace: Trace) -> dict:
        h, mask = state["h"], None
        if self.gate is not None:
            mask = trace.mask(self.gate(h), self.conv2.groups())
        return {"h": self(h, mask)}

    def cost(self, tally: Tally) -> None:
        conv2 = self.conv2
        h, w = tally.size
        ho, wo = conv_out(h, conv2.stride), conv_out(w, conv2.stride)
        cin, width, cout = self.conv1.in_channels, conv2.channels, self.conv3.out_channels
        short = ho * wo * cin * cout if self.shortcut is not None else 0
        dense = h * w * cin * width + ho * wo * conv2.macs_per_pixel() + ho * wo * width * cout
        executed, gate = None, 0
        if self.gate is not None:
            i = tally.next()
            groups, k = conv2.groups(), tally.kept[:, i]
            cmax = (tally.masks[i] > 0).reshape(tally.batch, groups, -1).sum(-1).amax(-1)
            executed = h * w * cin * k + ho * wo * groups * cmax * cmax * 9 + ho * wo * k * cout
            executed += short
            gate = self.gate.macs(cin, h, w)
        tally.add(dense + short, executed, gate)
        tally.size = ho, wo

    def steps(self) -> list[Step]:
        if self.gate is None:
            return [Step(self._compact())]
        groups = self.conv2.groups()
        return [Step(self._compact(), gate=lambda state: self.gate(state["h"]), groups=groups,
                     key=functools.partial(group_key, groups))]

    def _compact(self):
        """The compact block: (state, keep) -> state."""
        w1, b1 = fold_conv_bn(self.conv1.weight[:, :, 0, 0], self.bn1)
        grouped, groups = self.conv2.grouped_weight()
        w2, b2 = fold_conv_bn(grouped, self.bn2)
        w3, b3 = fold_conv_bn(self.conv3.weight[:, :, 0, 0], self.bn3)
        width, size = w2.shape[0], w2.shape[1]
        # One zero column past the group's channels: what padded slots read.
        w2_ext = torch.cat([w2, w2.new_zeros(width, 1, 3, 3)], 1)
        stride = self.conv2.stride
        shortcut = None
        if self.shortcut is not None:
            ws, bs = fold_conv_bn(self.shortcut[0].weight, self.shortcut[1])
            shortcut = (ws, bs)

        def apply(state: dict, keep) -> dict:
            x = state["h"]
            identity = x if shortcut is None else F.conv2d(x, shortcut[0], shortcut[1], stride)
            if keep is None or keep.all():
                h = F.relu(F.conv2d(x, w1[:, :, None, None], b1))
                h = F.relu(F.conv2d(h, w2, b2, stride, 1, groups=groups))
                return {"h": F.relu(F.conv2d(h, w3[:, :, None, None], b3) + identity)}
            if not keep[0].any():
                return {"h": F.relu(identity + b3[:, None, None])}
            rows, slot, cmax = group_slots(keep, groups)
            b, k = rows.shape
            h1 = F.relu(torch.baddbmm(gather_rows(b1, rows)[..., None], gather_rows(w1, rows),
                                      x.flatten(2)))
            h1 = h1.reshape(b, k, *x.shape[2:])
            # Padded grouped layout: group i's kept channels sit in slots [i*cmax, i*cmax+c_i).
            padded = h1.new_zeros(b, groups * cmax, *x.shape[2:])
            padded.scatter_(1, slot[..., None, None].expand_as(h1), h1)
            local = torch.full((b, groups * cmax), size, dtype=torch.long, device=x.device)
            local.scatter_(1, slot, rows % size)  # each slot's channel index within its group
            out_rows = torch.full_like(local, 0).scatter_(1, slot, rows)
            members = local.reshape(b, groups, 1, cmax).expand(b, groups, cmax, cmax)
            weight = w2_ext[out_rows.reshape(b, groups, cmax)[..., None], members]
            weight = weight.reshape(b * groups * cmax, cmax, 3, 3)
            h2 = F.conv2d(padded.reshape(1, -1, *x.shape[2:]), weight, stride=stride, padding=1,
                          groups=b * groups)
            h2 = h2.reshape(b, groups * cmax, *h2.shape[2:])
            h2 = F.relu(h2.gather(1, slot[..., None, None].expand(b, k, *h2.shape[2:]))
                        + gather_rows(b2, rows)[..., None, None])
            out = conv1x1_gathered(h2, w3, rows, b3)
            return {"h": F.relu(out + identity)}
        return apply


class GResNeXt(GatedNetwork):
    architecture = "resnext"
    config_class = ResNeXtConfig

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

    def units(self) -> list[Unit]:
        pool = 2 if self.config.stem == "imagenet" else 1
        return [ConvStem(self.stem[0], self.stem, pool), *self.blocks, LinearHead(self.fc)]

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
