"""ACS DenseNet: a DenseNet whose dense layers each have a gate over their growth channels.

As in the ACS paper's code: growth 32, bn_size 2, 64 initial features, blocks (6, 6, 6) for
DenseNet-40, with a CIFAR stem (3x3 conv) and adaptive pooling. The transition pools before
its 1x1 convolution (the same function as conv-then-pool, a quarter of the MACs).

A skipped growth channel is 0; after the consumer's BN+ReLU it is a constant, so later 1x1
convolutions and the classifier fold it into a bias (see compact_densenet.py). A layer with
every channel skipped skips its 1x1 convolution too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.gates import make_gate
from ..core.base import GatedNetwork
from ..core.budget import BudgetPlan
from ..core.macs import Cost, kept_counts
from ..core.registry import register_model


@dataclass(frozen=True)
class DenseNetConfig:
    """Architecture of an (ACS) DenseNet; gate None gives the dense baseline."""

    num_classes: int = 10
    growth: int = 32
    bn_size: int = 2
    init_features: int = 64
    blocks: tuple[int, ...] = (6, 6, 6)
    compression: float = 0.5
    gate: str | None = "acs"
    input_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv producing `growth` channels, with an optional gate."""

    def __init__(self, in_channels: int, growth: int, bn_size: int, gate: str | None) -> None:
        super().__init__()
        width = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)
        self.gate = make_gate(gate, in_channels, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(h)))


class Transition(nn.Module):
    """BN-ReLU-2x2 average pool-1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.avg_pool2d(F.relu(self.norm(x)), 2))


class ACSDenseNet(GatedNetwork):
    architecture = "densenet"
    config_class = DenseNetConfig
    executor = "densenet_compact.CompactDenseNet"

    def __init__(self, config: DenseNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        c = config.init_features
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.block_inputs: list[int] = []
        for i, depth in enumerate(config.blocks):
            self.block_inputs.append(c)
            self.blocks.append(nn.ModuleList(
                DenseLayer(c + j * config.growth, config.growth, config.bn_size, config.gate)
                for j in range(depth)
            ))
            c += depth * config.growth
            if i < len(config.blocks) - 1:
                out = int(c * config.compression)
                self.transitions.append(Transition(c, out))
                c = out
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @property
    def min_input_size(self) -> int:
        return 2 ** len(self.transitions)

    def layers(self) -> list[DenseLayer]:
        return [layer for block in self.blocks for layer in block]

    def gated_totals(self) -> list[int]:
        return [self.config.growth for layer in self.layers() if layer.gate is not None]

    def run(self, x: torch.Tensor, plan: BudgetPlan):
        masks, scores = [], []
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [h]
            for layer in block:
                inp = torch.cat(features, 1)
                out = layer(inp)
                if layer.gate is not None:
                    s = layer.gate(inp)
                    m = self.straight_through(plan.select(len(masks), s), s)
                    out = out * m[:, :, None, None]
                    masks.append(m)
                    scores.append(s)
                features.append(out)
            h = torch.cat(features, 1)
            if i < len(self.transitions):
                h = self.transitions[i](h)
        h = F.adaptive_avg_pool2d(F.relu(self.norm(h)), 1).flatten(1)
        return self.classifier(h), masks, scores

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1) -> Cost:
        cfg = self.config
        batch = masks[0].shape[0] if masks else batch
        device = masks[0].device if masks else None
        kept = kept_counts(masks, batch, device)
        width_1x1 = cfg.bn_size * cfg.growth
        dense = height * width * 3 * cfg.init_features * 9
        executed = torch.full((batch,), dense, dtype=torch.long, device=device)
        gates = torch.zeros_like(executed)
        h, w = height, width
        gated = 0
        for i, block in enumerate(self.blocks):
            base = self.block_inputs[i]
            # Every layer's kept count; the channels present before each layer, per sample.
            columns = []
            for layer in block:
                if layer.gate is None:
                    columns.append(torch.full_like(executed, cfg.growth))
                else:
                    columns.append(kept[:, gated])
                    gated += 1
            k = torch.stack(columns, 1)
            present = base + k.cumsum(1) - k
            # Gate MACs are affine in the channels a gate reads: slope * present + offset.
            offsets = [layer.gate.macs(0, h, w) if layer.gate else 0 for layer in block]
            slopes = [layer.gate.macs(1, h, w) - o if layer.gate else 0
                      for layer, o in zip(block, offsets, strict=True)]
            g = (present * torch.tensor(slopes, device=device)).sum(1) + sum(offsets)
            gates += g
            executed += g
            executed += (h * w * width_1x1 * ((k > 0) * present + 9 * k)).sum(1)
            dense += sum(h * w * width_1x1 * (base + j * cfg.growth + 9 * cfg.growth)
                         for j in range(len(block)))
            end = base + k.sum(1)
            if i < len(self.transitions):
                h, w = h // 2, w // 2
                conv = self.transitions[i].conv
                dense += h * w * conv.in_channels * conv.out_channels
                executed += h * w * end * conv.out_channels
        dense += self.classifier.in_features * cfg.num_classes
        executed += end * cfg.num_classes
        return Cost(dense, executed, gates, kept, self.gated_totals())


SMOKE = {"growth": 8, "init_features": 16, "blocks": (2, 2, 2)}  # a small instance, for the contract tests


@register_model(ACSDenseNet, smoke=SMOKE)
def acs_densenet40(num_classes: int = 10, gate: str | None = "acs", **kwargs) -> ACSDenseNet:
    """ACS DenseNet-40 as in the paper's code, with an ACS-GN gate ('acs') per dense layer."""
    return ACSDenseNet(DenseNetConfig(num_classes=num_classes, gate=gate, **kwargs))


@register_model(ACSDenseNet, smoke=SMOKE)
def densenet40(num_classes: int = 10, **kwargs) -> ACSDenseNet:
    """The dense baseline: the same backbone and code with the gates off."""
    return ACSDenseNet(DenseNetConfig(num_classes=num_classes, gate=None, **kwargs))
