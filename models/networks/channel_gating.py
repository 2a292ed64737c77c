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

Compact execution: per gated convolution, the gate step computes the partial sum for every
output channel and pixel (part of the output, never recomputed) and scores each (channel,
pixel), with the operations of the masked reference (the same decisions on the same
numbers). The apply step computes the rest only for the output channels open at any pixel
of the sample (gathered weight rows; samples with equal open counts run together) and adds
it where the pixel is open (threshold, cap) or everywhere in the channel (topk); it records
the open pixels per sample for `pixel_executed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import GatedNetwork
from ..core.budget import BudgetPlan
from ..core.macs import Cost, conv_out
from ..core.registry import register_model
from ..core.units import Step, Tally, Trace, Unit
from .cifar_resnet import build_resnet, resnet_units


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


class CGTally(Tally):
    """The cost walk's sums, with the per-pixel ideal count (`pixel`: a gated convolution's
    rest counted at its open pixels only; everything else as executed)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.pixel = torch.zeros_like(self.executed)

    def add(self, dense: int, executed=None, gate=0, pixel=None) -> None:
        super().add(dense, executed, gate)
        self.pixel += (dense if executed is None else executed) if pixel is None else pixel

    def cost(self, totals: list[int]) -> ChannelGatingCost:
        return ChannelGatingCost(self.dense, self.executed, self.gates, self.kept, totals,
                                 self.pixel)


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


def rest_rows(conv: ChannelGatedConv2d, x: torch.Tensor,
              keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rest of `conv` for each sample's kept output channels: (rows (B, k), rest (B, k, H, W));
    rows None when every channel is kept. Every sample keeps the same number k."""
    b = x.shape[0]
    weight = conv.rest_weight()
    xr = x[:, conv.base :]
    if keep.all():
        return None, F.conv2d(xr, weight, None, conv.stride, 1)
    rows = keep.nonzero()[:, 1].reshape(b, -1)
    k = rows.shape[1]
    if b == 1:
        return rows, F.conv2d(xr, weight.index_select(0, rows[0]), None, conv.stride, 1)
    gathered = weight.index_select(0, rows.reshape(-1))
    c, height, width = xr.shape[1:]
    out = F.conv2d(xr.reshape(1, b * c, height, width), gathered, None, conv.stride, 1, groups=b)
    return rows, out.reshape(b, k, *out.shape[-2:])


def _gate_scores(conv: ChannelGatedConv2d, source: str):
    def scores(state: dict) -> torch.Tensor:
        p = conv.partial(state[source])
        s = conv.scores(p)
        state["p"], state["s"] = p, s  # sliced with the state if the batch splits
        return s.amax((2, 3))
    return scores


class OpenPixels:
    """A compact call's side channel: open (channel, pixel) pairs per sample of each gated
    convolution. Shared (not sliced) by the sub-batches of one call, indexed by each
    sample's original row."""

    def __init__(self, batch: int, device) -> None:
        self.batch, self.device = batch, device
        self.open: dict[ChannelGatedConv2d, torch.Tensor] = {}

    def of(self, conv: ChannelGatedConv2d) -> torch.Tensor:
        """(B,) open pairs of `conv`, written by its step."""
        if conv not in self.open:
            self.open[conv] = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        return self.open[conv]


class CGBlock(nn.Module, Unit):
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

    def gated_layers(self) -> list[tuple[int, int]]:
        return [(c.out_channels, 1) for c in (self.conv1, self.conv2) if c.gate is not None]

    def reference(self, state: dict, trace: Trace) -> dict:
        h = state["h"]
        h1 = F.relu(self.bn1(self._reference_conv(self.conv1, h, trace)))
        h2 = self.bn2(self._reference_conv(self.conv2, h1, trace))
        return {"h": F.relu(h2 + self.short(h))}

    @staticmethod
    def _reference_conv(conv: ChannelGatedConv2d, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The masked convolution; records its open pixels (`trace.extra`)."""
        if conv.gate is None:
            return conv.conv(x)
        p = conv.partial(x)
        s = conv.scores(p)
        channel_scores = s.amax((2, 3))
        keep = trace.keep(channel_scores)
        pixels = pixel_mask(trace.plan.policy, trace.plan.tau, keep, s)
        trace.add("open_pixels", pixels.sum((1, 2, 3)))
        trace.record(keep, channel_scores)
        return p + trace.straight_through(pixels, s) * conv.rest(x)

    def cost(self, tally: Tally) -> None:
        """The per-channel realization's MACs, and the per-pixel ideal count from the open
        pixels (without them, a kept channel counts as open at every pixel)."""
        open_pixels = tally.extra.get("open_pixels")
        for conv in (self.conv1, self.conv2):
            h, w = tally.size
            ho, wo = conv_out(h, conv.stride), conv_out(w, conv.stride)
            full = ho * wo * 9 * conv.in_channels * conv.out_channels
            if conv.gate is None:
                tally.add(full)
            else:
                base = ho * wo * 9 * conv.base * conv.out_channels
                rest = 9 * (conv.in_channels - conv.base)  # per open (channel, pixel)
                i = tally.next()
                k = tally.kept[:, i]
                opened = k * ho * wo if open_pixels is None else open_pixels[i].to(k)
                tally.add(full, base + k * ho * wo * rest, pixel=base + opened * rest)
            tally.size = ho, wo
        if self.shortcut is not None:
            conv = self.shortcut[0]
            tally.add(ho * wo * conv.in_channels * conv.out_channels)

    def steps(self) -> list[Step]:
        steps = []
        for which, conv in (("conv1", self.conv1), ("conv2", self.conv2)):
            apply = self._compact(which)
            if conv.gate is None:
                steps.append(Step(apply))
            else:
                steps.append(Step(apply, gate=_gate_scores(conv, "h" if which == "conv1" else "h1")))
        return steps

    def _compact(self, which: str):
        """One convolution of the block: (state, keep) -> state."""
        conv = getattr(self, which)

        def output(state: dict, keep) -> torch.Tensor:
            x = state["h"] if which == "conv1" else state["h1"]
            if conv.gate is None:
                return conv.conv(x)
            p, s = state["p"], state["s"]
            pixels = pixel_mask(state["policy"], state["tau"], keep, s)
            state["record"].of(conv)[state["index"]] = pixels.sum((1, 2, 3))
            if not keep.any():
                return p
            rows, rest = rest_rows(conv, x, keep)
            if rows is None:
                return p + pixels.to(p.dtype) * rest
            index = rows[:, :, None, None].expand_as(rest)
            return p.scatter_add(1, index, rest * pixels.gather(1, index).to(rest.dtype))

        def apply(state: dict, keep) -> dict:
            y = output(state, keep)
            state = {k: v for k, v in state.items() if k not in ("p", "s")}
            if which == "conv1":
                return {**state, "h1": F.relu(self.bn1(y))}
            h = F.relu(self.bn2(y) + self.short(state["h"]))
            return {k: v for k, v in state.items() if k != "h1"} | {"h": h}
        return apply


class CGResNet(GatedNetwork):
    """Channel-gated CIFAR ResNet; see the module docstring for the budget mapping."""

    architecture = "cg_resnet"
    config_class = CGResNetConfig
    tally_class = CGTally

    def __init__(self, config: CGResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        build_resnet(self, config.blocks, config.widths, config.num_classes,
                     lambda cin, cout, stride: CGBlock(cin, cout, stride, config.base_fraction,
                                                       config.gate))

    def convs(self) -> list[ChannelGatedConv2d]:
        """Every channel-gated convolution, in execution order."""
        return [conv for block in self.blocks for conv in (block.conv1, block.conv2)]

    def gate_modules(self) -> list[nn.Module]:
        return [conv.gate for conv in self.convs() if conv.gate is not None]

    def units(self) -> list[Unit]:
        return resnet_units(self)

    def compact_state(self, x: torch.Tensor, plan: BudgetPlan) -> dict:
        """The input, tau and the policy (for the per-pixel masks), every sample's row, and a
        record of open pixels (for the per-pixel MAC count)."""
        return {"x": x, "tau": plan.tau, "policy": plan.policy,
                "index": torch.arange(x.shape[0], device=x.device),
                "record": OpenPixels(x.shape[0], x.device)}

    def compact_extra(self, state: dict) -> dict:
        record = state["record"]
        return {"open_pixels": [record.of(c) for c in self.convs() if c.gate is not None]}

SMOKE = {"blocks": (1, 1), "widths": (8, 16)}  # a small instance, for the contract tests


@register_model(CGResNet, smoke=SMOKE)
def cg_resnet20(num_classes: int = 10, **kwargs) -> CGResNet:
    """Channel-gated ResNet-20 (16/32/64 channels), partial sums over 1/4 of the inputs."""
    return CGResNet(CGResNetConfig(num_classes=num_classes, **kwargs))


@register_model(CGResNet, smoke=SMOKE)
def resnet20(num_classes: int = 10, **kwargs) -> CGResNet:
    """The dense baseline: ResNet-20, the same code with the gates off."""
    return CGResNet(CGResNetConfig(num_classes=num_classes, gate=False, **kwargs))
