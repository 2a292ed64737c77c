"""Ranked FastNet: the FastNet backbone run at a few width levels, each a prefix of every layer.

Budget-native: every 3x3 convolution keeps the first `level * C` of its output channels
(in blocks of `block`), the same fraction in every layer, so a level is a dense network made
of contiguous weight slices, which a runtime compiles once (`variants()`) and runs with
prepacked weights: no gathers, no per-request re-layouts. The channel order is ranked by
importance when training starts from a dense FastNet (`order_channels`), and training
(`acs-train --budget-schedule per-sample`) runs every image at its own random level,
distilled from the dense network, so every prefix is a good network.

The gate is the narrow network itself (a confidence cascade, `models.core.levels`): under
`threshold` each image first runs a probe level; if its confidence is high it stops there,
else it runs a wider level. The budget sets the probe level, the wider level and the
confidence threshold (calibrated on held-out data, `acs-train calibrate`), so executed MACs
track the budget on average; the probe's MACs count as gate MACs. `topk` runs every image
at the widest level within the budget; `cap` escalates only to a level that keeps probe
plus level within the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.levels import LevelNetwork, check_levels
from ..core.registry import register_model
from ..core.units import Unit
from .fastnet import FastHead, FastLayer, FastNet, FastNetConfig, FastVariant

LEVELS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class RankedFastNetConfig:
    """A FastNet run at width `levels` (fractions of every layer, in blocks of `block`)."""

    num_classes: int = 10
    widths: tuple[int, ...] = (64, 256, 256)
    levels: tuple[float, ...] = LEVELS
    block: int = 8
    bn_momentum: float = 0.4
    head_scale: float = 1 / 9
    input_size: int = 32

    def __post_init__(self) -> None:
        check_levels("levels", self.levels)
        if any(w % self.block for w in self.widths):
            raise ValueError(f"every width {self.widths} must be a multiple of block {self.block}")

    def backbone(self) -> FastNetConfig:
        return FastNetConfig(self.num_classes, self.widths, None, self.block, False,
                             self.bn_momentum, self.head_scale, self.input_size)

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixScores:
    """A ranked layer's block scores: a fixed priority, earlier blocks first (no MACs)."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    def __call__(self, h: torch.Tensor, index=None) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, self.blocks, device=h.device).expand(h.shape[0], -1)

    def macs(self, in_channels: int, height: int, width: int) -> int:
        return 0


class RankedFastNet(LevelNetwork, FastNet):
    """A FastNet whose layers keep prefixes of their channels at a few width levels."""

    architecture = "ranked_fastnet"
    config_class = RankedFastNetConfig

    def __init__(self, config: RankedFastNetConfig) -> None:
        FastNet.__init__(self, config.backbone())
        self.config = config

    def units(self) -> list[Unit]:
        block = self.config.block
        layers = [FastLayer(conv, norm, PrefixScores(norm.num_features // block), i % 2 == 0, block)
                  for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True))]
        return [self.stem(), *layers, FastHead(self.head, self.config.head_scale)]

    def level_counts(self, level: int) -> list[int]:
        """Blocks kept in every gated layer at width level `level`."""
        width, block = self.config.levels[level], self.config.block
        return [max(1, round(width * c / block)) for c in self.config.widths for _ in range(2)]

    def variant(self, level: int) -> nn.Module:
        counts = [n * self.config.block for n in self.level_counts(level)]
        return FastVariant(self, counts).eval()

    @torch.no_grad()
    def order_channels(self) -> None:
        """Rank every layer's output channels by importance (the norm of the weights that read
        them: the next convolution's, or the classifier's), most important first, so that
        the prefixes of a dense FastNet keep what matters."""
        readers = [*self.convs[1:], self.head]
        for conv, norm, reader in zip(self.convs, self.norms, readers, strict=True):
            weight = reader.weight
            importance = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            order = importance.argsort(descending=True)
            conv.weight.copy_(conv.weight[order])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(getattr(norm, name)[order])
            reader.weight.copy_(reader.weight[:, order])


SMOKE = {"widths": (16, 32, 32), "levels": (0.5, 1.0)}  # a small instance, for the contract tests


@register_model(RankedFastNet, smoke=SMOKE)
def acs_ranked_fastnet(num_classes: int = 10, **kwargs) -> RankedFastNet:
    """Ranked FastNet (64/256/256, width levels 0.25-1.0 in eighths, blocks of 8 channels)."""
    return RankedFastNet(RankedFastNetConfig(num_classes=num_classes, **kwargs))
