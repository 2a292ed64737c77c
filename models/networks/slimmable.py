"""Universally slimmable ResNet (US-Nets, Yu & Huang 2019): one network, any width; the
budget picks the width.

Every convolution at width multiplier w uses the contiguous prefix of its weight: the first
n_out(w) output channels and the first n_in(w) input channels, n(w) = max(1, round(w * C)).
The widths a model serves are `config.width_levels` (0.25 to 1.0 in steps of 1/16 by
default); each level has its own BatchNorm running statistics (registered buffers of shape
(levels, C), saved with the weights), re-estimated after training by `recalibrate_bn`, while
the BN affine weight and bias are shared and sliced, as in US-Nets.

Gated layers, in execution order: the residual stream of each stage (the stem's output for
the first; decided just before the first block of each later stage) and the inner width of
every block (its first convolution's output). A layer's mask keeps a prefix of its channels.
The width levels keep every layer at the same multiplier; a table of per-layer counts (for
instance from a per-layer width search, as AutoSlim does) works too, since every layer
slices its own prefix; BN statistics are then those of the level each layer's count falls in.

Budget -> width. The calibration table (`uniform_table`, exact, no data needed) has one row
per width level: budget = that width's MAC ratio, counts = its per-layer channels. A request
runs the widest level whose cost is <= its budget, so its cost never exceeds the budget
(above the narrowest width's cost, the floor). Widths do not depend on the input, so the
policies coincide: threshold, topk and cap all run that width (tau is ignored); `scores` are
a fixed channel priority (earlier channels first). Training: the training CLI's budget passes
(widest, narrowest, random; in-place distillation) are the sandwich rule here, every width
with batch statistics; `recalibrate_bn` re-estimates each width's statistics afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import GatedNetwork
from ..core.budget import CalibrationTable
from ..core.folding import scale_rows
from ..core.levels import WidthPlan, check_levels, width_table
from ..core.macs import conv_out
from ..core.registry import register_model
from ..core.units import LinearHead, Step, Tally, Trace, Unit, classifier_cost
from .cifar_resnet import build_resnet

DEFAULT_LEVELS = tuple(i / 16 for i in range(4, 17))  # 0.25, 0.3125, ..., 1.0


def channels_at(channels: int, width: float) -> int:
    """Channels of a C-channel layer at width multiplier `width`."""
    return max(1, int(channels * width + 0.5))


@dataclass(frozen=True)
class SlimmableResNetConfig:
    """A CIFAR ResNet (basic blocks) runnable at every width of `width_levels`."""

    num_classes: int = 10
    blocks: tuple[int, ...] = (3, 3, 3)
    widths: tuple[int, ...] = (16, 32, 64)
    width_levels: tuple[float, ...] = DEFAULT_LEVELS
    input_size: int = 32

    def __post_init__(self) -> None:
        check_levels("width_levels", self.width_levels)

    def to_dict(self) -> dict:
        return asdict(self)


class SwitchableBatchNorm2d(nn.Module):
    """BatchNorm over the first n channels of a slimmable layer, with running statistics
    per width level (buffers (levels, C)); the affine weight and bias are shared and sliced.

    A sample's level is the narrowest level with at least its channel count. In training
    mode, each level's samples are normalized with their own batch statistics, which update
    that level's running statistics (`momentum` None: a cumulative average, as used by
    `recalibrate_bn`). Deliberately not a torch `_BatchNorm`, so generic BN code (SyncBN
    conversion, resets) does not treat its (levels, C) buffers as plain BN statistics.
    """

    def __init__(self, channels: int, level_channels: Sequence[int], eps: float = 1e-5,
                 momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = channels
        self.level_channels = list(level_channels)
        self.eps, self.momentum = eps, momentum
        levels = len(self.level_channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(levels, channels))
        self.register_buffer("running_var", torch.ones(levels, channels))
        self.register_buffer("num_batches_tracked", torch.zeros(levels, dtype=torch.long))
        self.register_buffer("levels", torch.tensor(self.level_channels), persistent=False)

    def level_of(self, count: torch.Tensor) -> torch.Tensor:
        """(B,) width level of each sample from its channel count (B,)."""
        level = torch.searchsorted(self.levels, count.to(self.levels.device).contiguous())
        return level.clamp(max=len(self.level_channels) - 1)

    @torch.no_grad()
    def reset_level(self, level: int) -> None:
        self.running_mean[level].zero_()
        self.running_var[level].fill_(1.0)
        self.num_batches_tracked[level].zero_()

    def affine(self, level: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the first `channels` channels at a level, in eval mode."""
        var = self.running_var[level, :channels]
        scale = self.weight[:channels] / torch.sqrt(var + self.eps)
        return scale, self.bias[:channels] - self.running_mean[level, :channels] * scale

    def _normalize(self, x: torch.Tensor, level: int) -> torch.Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training:
            self.num_batches_tracked[level] += 1
            n = int(self.num_batches_tracked[level])
            factor = 1.0 / n if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean[level, :c], self.running_var[level, :c],
                            self.weight[:c], self.bias[:c], self.training, factor, self.eps)

    def forward(self, x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """x (B, c, H, W) holding the first c channels; count (B,) channels kept per sample."""
        level = self.level_of(count)
        values = level.unique()
        if len(values) == 1:
            return self._normalize(x, int(values[0]))
        if self.training:
            parts, order = [], []
            for value in values.tolist():
                rows = (level == value).nonzero()[:, 0]
                parts.append(self._normalize(x[rows], value))
                order.append(rows)
            return torch.cat(parts)[torch.cat(order).argsort()]
        c = x.shape[1]
        mean, var = self.running_mean[level, :c], self.running_var[level, :c]
        scale = self.weight[:c] / torch.sqrt(var + self.eps)
        shift = self.bias[:c] - mean * scale
        return x * scale[..., None, None] + shift[..., None, None]


def priority(total: int, batch: int, device) -> torch.Tensor:
    """Fixed channel scores (B, C): earlier channels first. Slimmable has no gate."""
    return torch.linspace(1.0, 0.0, total, device=device).expand(batch, total)


def _priority_gate(total: int):
    """The compact steps' scores: the fixed priority."""
    def scores(state: dict) -> torch.Tensor:
        x = state["h"] if "h" in state else state["x"]
        return priority(total, x.shape[0], x.device)
    return scores


def _width(trace: Trace, total: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The next gated layer's (mask (B, C), count (B,)): the plan's prefix."""
    scores = priority(total, batch, device)
    keep = trace.keep(scores)
    return trace.record(keep, scores), keep.sum(1)


class FoldedSlices:
    """weight[:cout, :cin] of a convolution with the BN of cout's width level folded in, and
    its bias; built once per (cin, cout)."""

    def __init__(self, conv: nn.Conv2d, bn: SwitchableBatchNorm2d) -> None:
        self.conv, self.bn, self.cache = conv, bn, {}

    def __call__(self, cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (cin, cout) not in self.cache:
            with torch.no_grad():
                level = int(self.bn.level_of(torch.tensor([cout]))[0])
                scale, shift = self.bn.affine(level, cout)
                weight = scale_rows(self.conv.weight[:cout, :cin], scale)
                self.cache[cin, cout] = (weight.contiguous(), shift.contiguous())
        return self.cache[cin, cout]


class SlimStem(Unit):
    """3x3 conv -> BN -> ReLU at the width of the first stream (gated layer 0)."""

    def __init__(self, conv: nn.Conv2d, bn: SwitchableBatchNorm2d) -> None:
        self.conv, self.bn = conv, bn

    def gated_layers(self) -> list[tuple[int, int]]:
        return [(self.conv.out_channels, 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        x = state["x"]
        mask, count = _width(trace, self.conv.out_channels, x.shape[0], x.device)
        h = F.relu(self.bn(self.conv(x), count)) * mask[:, :, None, None]
        return {"h": h, "stream": (mask, count)}

    def cost(self, tally: Tally) -> None:
        h, w = tally.size
        k = tally.kept[:, tally.next()]
        tally.add(h * w * 27 * self.conv.out_channels, h * w * 27 * k)
        tally.flow["channels"] = k

    def steps(self) -> list[Step]:
        fold = FoldedSlices(self.conv, self.bn)

        def apply(state: dict, keep) -> dict:
            c = int(keep[0].sum())
            h = F.relu(F.conv2d(state["x"], *fold(3, c), padding=1))
            return {"h": h, "c": c, "out": c}
        return [Step(apply, gate=_priority_gate(self.conv.out_channels))]


class StreamWidth(Unit):
    """The residual stream's width from a projection block on (a gated layer decided before
    the block; no computation of its own)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def gated_layers(self) -> list[tuple[int, int]]:
        return [(self.channels, 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        x = state["h"]
        return state | {"next": _width(trace, self.channels, x.shape[0], x.device)}

    def cost(self, tally: Tally) -> None:
        tally.flow["next"] = tally.kept[:, tally.next()]

    def steps(self) -> list[Step]:
        return [Step(lambda state, keep: {**state, "out": int(keep[0].sum())},
                     gate=_priority_gate(self.channels))]


class SlimBlock(nn.Module, Unit):
    """Basic block: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, plus shortcut, ReLU; gated on its
    inner width. It reads the stream's width and writes the stream's next width (a
    projection block's, decided by the `StreamWidth` before it; else the same)."""

    def __init__(self, cin: int, cout: int, stride: int, bn) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.short_conv = self.short_bn = None
        if stride != 1 or cin != cout:
            self.short_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.short_bn = bn(cout)

    def gated_layers(self) -> list[tuple[int, int]]:
        return [(self.conv1.out_channels, 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        h = state["h"]
        mask, count = _width(trace, self.conv1.out_channels, h.shape[0], h.device)
        inner = F.relu(self.bn1(self.conv1(h), count)) * mask[:, :, None, None]
        out_mask, out_count = state.get("next", state["stream"])
        out = self.bn2(self.conv2(inner), out_count)
        short = h if self.short_conv is None else self.short_bn(self.short_conv(h), out_count)
        return {"h": F.relu(out + short) * out_mask[:, :, None, None],
                "stream": (out_mask, out_count)}

    def cost(self, tally: Tally) -> None:
        h, w = tally.size
        ho, wo = conv_out(h, self.stride), conv_out(w, self.stride)
        full_in, full_out = self.conv1.in_channels, self.conv1.out_channels
        cin, k = tally.flow["channels"], tally.kept[:, tally.next()]
        cout = tally.flow.pop("next", cin)
        tally.add(ho * wo * 9 * (full_in * full_out + full_out * full_out),
                  ho * wo * 9 * (cin * k + k * cout))
        if self.short_conv is not None:
            tally.add(ho * wo * full_in * full_out, ho * wo * cin * cout)
        tally.size = ho, wo
        tally.flow["channels"] = cout

    def steps(self) -> list[Step]:
        fold1, fold2 = FoldedSlices(self.conv1, self.bn1), FoldedSlices(self.conv2, self.bn2)
        fold_short = None if self.short_conv is None else FoldedSlices(self.short_conv, self.short_bn)

        def apply(state: dict, keep) -> dict:
            h, cin, cout = state["h"], state["c"], state["out"]
            k = int(keep[0].sum())
            inner = F.relu(F.conv2d(h, *fold1(cin, k), self.stride, 1))
            out = F.conv2d(inner, *fold2(k, cout), 1, 1)
            short = h if fold_short is None else F.conv2d(h, *fold_short(cin, cout), self.stride)
            return {"h": F.relu(out + short), "c": cout, "out": cout}
        return [Step(apply, gate=_priority_gate(self.conv1.out_channels))]


class SlimHead(LinearHead):
    """Global average pool -> the classifier's columns of the stream's width."""

    def cost(self, tally: Tally) -> None:
        classifier_cost(tally, self.fc)

    def steps(self) -> list[Step]:
        def apply(state: dict, keep) -> dict:
            x = state["h"].mean((2, 3))
            return {"logits": F.linear(x, self.fc.weight[:, : state["c"]], self.fc.bias)}
        return [Step(apply)]


class SlimmableResNet(GatedNetwork):
    """A slimmable CIFAR ResNet; see the module docstring for the budget mapping."""

    architecture = "slimmable_resnet"
    config_class = SlimmableResNetConfig
    adaptive = False  # the cost does not depend on the input: no data calibration needed

    def __init__(self, config: SlimmableResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        levels = config.width_levels

        def bn(c: int) -> SwitchableBatchNorm2d:
            return SwitchableBatchNorm2d(c, [channels_at(c, w) for w in levels])

        build_resnet(self, config.blocks, config.widths, config.num_classes,
                     lambda cin, cout, stride: SlimBlock(cin, cout, stride, bn), bn)

    # --- budget mapping ---------------------------------------------------------------

    def units(self) -> list[Unit]:
        units: list[Unit] = [SlimStem(self.stem, self.stem_bn)]
        for block in self.blocks:
            if block.short_conv is not None:
                units.append(StreamWidth(block.conv1.out_channels))
            units.append(block)
        return units + [SlimHead(self.fc)]

    def level_counts(self, level: int) -> list[int]:
        """Channels of every gated layer at width level `level`."""
        width = self.config.width_levels[level]
        return [channels_at(t, width) for t in self.gated_totals()]

    def level_index(self, width: float) -> int:
        """The widest level <= width (the narrowest level for anything below it)."""
        levels = self.config.width_levels
        return max([i for i, w in enumerate(levels) if w <= width + 1e-9] or [0])

    def floor(self) -> float:
        """Executed-MAC ratio at the narrowest width."""
        return float(self.count_cost(self.level_counts(0)).ratio[0])

    def uniform_table(self, step: float | None = None) -> CalibrationTable:
        """The exact table: one row per width level (budget = its MAC ratio); `step` unused."""
        levels = self.config.width_levels
        return width_table(self, [self.level_counts(i) for i in range(len(levels))], list(levels))

    def plan(self, budget, policy: str, batch: int, device) -> WidthPlan:
        return WidthPlan.resolve(self.table, budget, policy, batch, device,
                                 minimum=tuple(self.level_counts(0)))

    def width_plan(self, width: float, batch: int, device) -> WidthPlan:
        """A plan running every sample at width level `level_index(width)`."""
        level = self.level_index(width)
        counts = torch.tensor([self.level_counts(level)] * batch, device=device)
        budget = torch.full((batch,), float(self.count_cost(self.level_counts(level)).ratio[0]),
                            device=device)
        return WidthPlan("topk", budget, budget, torch.zeros(batch, device=device), counts,
                         tuple(self.level_counts(0)))

    def forward_width(self, x: torch.Tensor, width: float) -> torch.Tensor:
        """Logits at one width (any mode; in training mode BN uses batch statistics)."""
        self.check_input(x)
        return self.run(x, self.width_plan(width, x.shape[0], x.device))[0]

    # --- training hooks ---------------------------------------------------------------

    def recalibrate(self, batches: Iterable[torch.Tensor]) -> int:
        """Every width's BN statistics, re-estimated (`recalibrate_bn`)."""
        return recalibrate_bn(self, batches)

    def calibrated_state(self) -> dict[str, torch.Tensor]:
        """The switchable BN layers' statistics."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def recalibrate_bn(model: SlimmableResNet, batches: Iterable[torch.Tensor],
                   widths: Sequence[float] | None = None) -> int:
    """Re-estimate the BN running statistics of each width level (all, or the levels of
    `widths`) from image batches (normalized, (B, 3, H, W)), as US-Nets do after training.

    Each level's statistics are reset, then averaged (cumulatively) over every batch run at
    that width; the other levels are untouched. The batches are read once (each batch runs
    at every level). Returns the number of batches read. The model's mode is restored.
    """
    levels = range(len(model.config.width_levels)) if widths is None else \
        sorted({model.level_index(w) for w in widths})
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    training = model.training
    for bn in bns:
        bn.momentum = None
        for level in levels:
            bn.reset_level(level)
    model.train()
    count = 0
    try:
        for x in batches:
            for level in levels:
                model.forward_width(x, model.config.width_levels[level])
            count += 1
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(training)
    return count


@register_model(SlimmableResNet, smoke={"blocks": (1, 1), "widths": (16, 32)})
def slimmable_resnet20(num_classes: int = 10, **kwargs) -> SlimmableResNet:
    """Slimmable ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels) at widths 0.25-1."""
    return SlimmableResNet(SlimmableResNetConfig(num_classes=num_classes, **kwargs))
