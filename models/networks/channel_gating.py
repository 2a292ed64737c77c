"""Channel Gating ResNet (Hua et al., NeurIPS 2019): a partial sum over the first fraction of
a convolution's input channels decides, per output channel and pixel, whether to compute
the rest.

Every 3x3 convolution of the residual blocks is a `ChannelGatedConv2d`. Its partial sum
p = W[:, :base] * x[:, :base] (base = round(base_fraction * C_in) input channels) is computed
for every output channel and pixel; the gate score is s = sigmoid(BN_g(p)) per (channel,
pixel), BN_g being a BatchNorm of the partial sum whose learned affine weight and bias are
the gate's sharpness and (negated) threshold Delta. Where the gate opens, the output is
p + W[:, base:] * x[:, base:]; elsewhere it is p alone. The stem (3 input channels), the 1x1
projection shortcuts and the classifier are not gated.

Budget -> gate threshold, per policy (channel score S = the highest pixel score of a channel):
- threshold: pixels with s >= tau(b) open; a channel computes its rest where any pixel is open.
- topk: the counts_l(b) channels with the best S compute their rest, at every pixel (the
  same executed MACs for every request).
- cap: threshold, but in no more channels per layer than topk allows (best S first), so
  the executed MACs never exceed the budget.

Two MAC counts, both in the cost:
- `Cost.executed` is what the compact executor really runs (and what budgets bound): on a
  CPU or GPU with dense kernels the rest is realized per output channel, so a channel open
  at any pixel of a sample computes its rest at every pixel of that sample (and the closed
  pixels' results are discarded).
- `ChannelGatingCost.pixel_executed` is the paper's ideal count: the rest only at open
  (channel, pixel) positions, as hardware with per-pixel gating would run it.
The gates themselves cost no MACs: the partial sums are part of the convolution (reused,
not recomputed) and the normalization and comparison are element-wise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import GatedNetwork
from ..core.budget import BudgetPlan
from ..core.macs import Cost, conv_out, kept_counts
from ..core.registry import register_model
from .cifar_resnet import resnet_layout


@dataclass(frozen=True)
class CGResNetConfig:
    """A CIFAR ResNet (basic blocks) with channel gating; gate False gives the dense baseline."""

    num_classes: int = 10
    blocks: tuple[int, ...] = (3, 3, 3)
    widths: tuple[int, ...] = (16, 32, 64)
    base_fraction: float = 0.25
    gate: bool = True
    input_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.base_fraction < 1.0:
            raise ValueError(f"base_fraction {self.base_fraction} must be in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChannelGatingCost(Cost):
    """Cost of a channel-gated forward pass.

    `executed`: MACs the per-channel realization runs (the compact executor; what budgets
    bound). `pixel_executed`: the paper's ideal count, the rest computed only at open
    (channel, pixel) positions; never above `executed`.
    """

    pixel_executed: torch.Tensor | None = None

    @property
    def pixel_ratio(self) -> torch.Tensor:
        return self.pixel_executed.double() / self.dense


class ChannelGatedConv2d(nn.Module):
    """3x3 convolution whose rest (input channels base:) runs only where the gate opens."""

    def __init__(self, cin: int, cout: int, stride: int, base_fraction: float, gated: bool) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.base = min(cin - 1, max(1, round(cin * base_fraction))) if gated else cin
        self.gate = nn.BatchNorm2d(cout) if gated else None
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, 1.0)  # open at first

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """The partial sum over the first `base` input channels, every output channel."""
        return F.conv2d(x[:, : self.base], self.conv.weight[:, : self.base], None, self.stride, 1)

    def rest_weight(self) -> torch.Tensor:
        return self.conv.weight[:, self.base :]

    def rest(self, x: torch.Tensor) -> torch.Tensor:
        """The remaining input channels' contribution, every output channel."""
        return F.conv2d(x[:, self.base :], self.rest_weight(), None, self.stride, 1)

    def scores(self, partial: torch.Tensor) -> torch.Tensor:
        """Per (channel, pixel) gate scores in [0, 1] from the partial sum."""
        return torch.sigmoid(self.gate(partial))


def pixel_mask(policy: str, tau: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) bool: where the rest is used. topk: every pixel of a kept channel;
    threshold and cap: the kept channels' pixels whose score is >= tau."""
    channel = keep[:, :, None, None]
    if policy == "topk":
        return channel.expand_as(scores)
    return channel & (scores >= tau.to(scores.dtype)[:, None, None, None])


class CGBlock(nn.Module):
    """Basic block with two channel-gated 3x3 convolutions; 1x1 projection shortcut where
    the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, base_fraction: float, gated: bool) -> None:
        super().__init__()
        self.conv1 = ChannelGatedConv2d(cin, cout, stride, base_fraction, gated)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = ChannelGatedConv2d(cout, cout, 1, base_fraction, gated)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def short(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.shortcut is None else self.shortcut(x)


class CGResNet(GatedNetwork):
    """Channel-gated CIFAR ResNet; see the module docstring for the budget mapping."""

    architecture = "cg_resnet"
    config_class = CGResNetConfig
    executor = "channel_gating_compact.CompactCGResNet"


    def __init__(self, config: CGResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        c0 = config.widths[0]
        self.stem = nn.Conv2d(3, c0, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c0)
        self.blocks = nn.ModuleList(CGBlock(cin, cout, stride, config.base_fraction, config.gate)
                                    for cin, cout, stride in resnet_layout(config.blocks, config.widths))
        self.fc = nn.Linear(config.widths[-1], config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def convs(self) -> list[ChannelGatedConv2d]:
        """Every channel-gated convolution, in execution order."""
        return [conv for block in self.blocks for conv in (block.conv1, block.conv2)]

    def gated_totals(self) -> list[int]:
        return [conv.out_channels for conv in self.convs() if conv.gate is not None]

    def gate_modules(self) -> list[nn.Module]:
        return [conv.gate for conv in self.convs() if conv.gate is not None]

    def run(self, x: torch.Tensor, plan: BudgetPlan):
        return self.run_extra(x, plan)[:3]

    def _gated_conv(self, conv: ChannelGatedConv2d, x: torch.Tensor, plan: BudgetPlan,
                    masks: list, scores: list, open_pixels: list) -> torch.Tensor:
        if conv.gate is None:
            return conv.conv(x)
        p = conv.partial(x)
        s = conv.scores(p)
        channel_scores = s.amax((2, 3))
        keep = plan.select(len(masks), channel_scores)
        pixels = pixel_mask(plan.policy, plan.tau, keep, s)
        open_pixels.append(pixels.sum((1, 2, 3)))
        pm, cm = self.straight_through(pixels, s), self.straight_through(keep, channel_scores)
        masks.append(cm)
        scores.append(channel_scores)
        return p + pm * conv.rest(x)

    def run_extra(self, x: torch.Tensor, plan: BudgetPlan):
        """The masked reference, and the open pixels of every gated layer (for the per-pixel
        MAC count)."""
        masks, scores, open_pixels = [], [], []
        h = F.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h1 = F.relu(block.bn1(self._gated_conv(block.conv1, h, plan, masks, scores, open_pixels)))
            h2 = block.bn2(self._gated_conv(block.conv2, h1, plan, masks, scores, open_pixels))
            h = F.relu(h2 + block.short(h))
        return self.fc(h.mean((2, 3))), masks, scores, {"open_pixels": open_pixels}

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1,
             open_pixels: list[torch.Tensor] | None = None) -> ChannelGatingCost:
        """Executed MACs of the per-channel realization, and the per-pixel ideal count.

        `open_pixels` (per gated layer, (B,) open (channel, pixel) pairs) gives the ideal
        count; without it, a kept channel counts as open at every pixel (ideal = executed).
        """
        batch = masks[0].shape[0] if masks else batch
        device = masks[0].device if masks else None
        kept = kept_counts(masks, batch, device)
        h, w = height, width
        dense = h * w * 27 * self.stem.out_channels
        executed = torch.full((batch,), dense, dtype=torch.long, device=device)
        pixel = executed.clone()
        gated = 0
        for block in self.blocks:
            for conv in (block.conv1, block.conv2):
                ho, wo = conv_out(h, conv.stride), conv_out(w, conv.stride)
                full = ho * wo * 9 * conv.in_channels * conv.out_channels
                dense += full
                if conv.gate is None:
                    executed += full
                    pixel += full
                else:
                    base = ho * wo * 9 * conv.base * conv.out_channels
                    rest = 9 * (conv.in_channels - conv.base)  # per open (channel, pixel)
                    k = kept[:, gated]
                    executed += base + k * ho * wo * rest
                    opened = k * ho * wo if open_pixels is None else open_pixels[gated].to(k)
                    pixel += base + opened * rest
                    gated += 1
                h, w = ho, wo
            if block.shortcut is not None:
                conv = block.shortcut[0]
                short = h * w * conv.in_channels * conv.out_channels
                dense += short
                executed += short
                pixel += short
        classifier = self.fc.in_features * self.fc.out_features
        dense += classifier
        executed += classifier
        pixel += classifier
        return ChannelGatingCost(dense, executed, torch.zeros_like(executed), kept, self.gated_totals(),
                                 pixel)


SMOKE = {"blocks": (1, 1), "widths": (8, 16)}  # a small instance, for the contract tests


@register_model(CGResNet, smoke=SMOKE)
def cg_resnet20(num_classes: int = 10, **kwargs) -> CGResNet:
    """Channel-gated ResNet-20 (16/32/64 channels), partial sums over 1/4 of the inputs."""
    return CGResNet(CGResNetConfig(num_classes=num_classes, **kwargs))


@register_model(CGResNet, smoke=SMOKE)
def resnet20(num_classes: int = 10, **kwargs) -> CGResNet:
    """The dense baseline: ResNet-20, the same code with the gates off."""
    return CGResNet(CGResNetConfig(num_classes=num_classes, gate=False, **kwargs))
