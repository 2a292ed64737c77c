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
from ..core.budget import BudgetPlan, CalibrationTable, prefix_mask
from ..core.macs import Cost, conv_out, kept_counts
from ..core.registry import register_model
from .cifar_resnet import resnet_layout

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
        levels = self.width_levels
        if (not levels or levels[0] <= 0 or levels[-1] != 1.0
                or any(b <= a for a, b in zip(levels, levels[1:], strict=False))):
            raise ValueError(f"width_levels {levels} must increase from above 0 to exactly 1.0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WidthPlan(BudgetPlan):
    """A budget plan for a slimmable network: every policy keeps the prefix of counts(b)
    channels (at least `minimum`, the narrowest width), whatever the scores."""

    minimum: tuple[int, ...] = ()

    def select(self, layer: int, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        count = self.counts[:, layer]
        if self.minimum:
            count = count.clamp(min=self.minimum[layer])
        return prefix_mask(count, scores.shape[1])


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


class SlimBlock(nn.Module):
    """Basic block: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, plus shortcut, ReLU.

    `in_stream`, `inner`, `out_stream`: the gated layers giving its input width, its inner
    width and its output width."""

    def __init__(self, cin: int, cout: int, stride: int, bn, layers: tuple[int, int, int]) -> None:
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
        self.in_stream, self.inner, self.out_stream = layers


class SlimmableResNet(GatedNetwork):
    """A slimmable CIFAR ResNet; see the module docstring for the budget mapping."""

    architecture = "slimmable_resnet"
    config_class = SlimmableResNetConfig
    executor = "slimmable_compact.CompactSlimmableResNet"


    adaptive = False  # the cost does not depend on the input: no data calibration needed

    def __init__(self, config: SlimmableResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        levels = config.width_levels

        def bn(c: int) -> SwitchableBatchNorm2d:
            return SwitchableBatchNorm2d(c, [channels_at(c, w) for w in levels])

        self.stem = nn.Conv2d(3, config.widths[0], 3, padding=1, bias=False)
        self.stem_bn = bn(config.widths[0])
        totals, stream, blocks = [config.widths[0]], 0, []
        for cin, cout, stride in resnet_layout(config.blocks, config.widths):
            in_stream = stream
            if stride != 1 or cin != cout:
                stream = len(totals)
                totals.append(cout)
            inner = len(totals)
            totals.append(cout)
            blocks.append(SlimBlock(cin, cout, stride, bn, (in_stream, inner, stream)))
        self.blocks = nn.ModuleList(blocks)
        self.last_stream = stream
        self._totals = totals
        self.fc = nn.Linear(config.widths[-1], config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # --- budget mapping ---------------------------------------------------------------

    def gated_totals(self) -> list[int]:
        return list(self._totals)

    def level_counts(self, level: int) -> list[int]:
        """Channels of every gated layer at width level `level`."""
        width = self.config.width_levels[level]
        return [channels_at(t, width) for t in self._totals]

    def level_index(self, width: float) -> int:
        """The widest level <= width (the narrowest level for anything below it)."""
        levels = self.config.width_levels
        return max([i for i, w in enumerate(levels) if w <= width + 1e-9] or [0])

    def floor(self) -> float:
        """Executed-MAC ratio at the narrowest width."""
        return float(self.count_cost(self.level_counts(0)).ratio[0])

    def uniform_table(self, step: float | None = None) -> CalibrationTable:
        """The exact table: one row per width level (budget = its MAC ratio); `step` unused."""
        budgets, taus, counts, widths = [], [], [], []
        for level, width in enumerate(self.config.width_levels):
            row = self.level_counts(level)
            cost = float(self.count_cost(row).ratio[0])
            if budgets and (cost <= budgets[-1] or row == counts[-1]):
                continue  # a level no wider than the previous one (tiny layers)
            budgets.append(cost)
            taus.append(round(1.0 - width, 6))
            counts.append(row)
            widths.append(width)
        return CalibrationTable(budgets, taus, counts, budgets[0], "widths",
                                {"widths": widths, "method": "widest width level whose MAC "
                                 "ratio is <= the budget; exact, input-independent"})

    def plan(self, budget, policy: str, batch: int, device) -> WidthPlan:
        return WidthPlan.resolve(self.table, budget, policy, batch, device,
                                 minimum=tuple(self.level_counts(0)))

    def width_counts(self, plan: BudgetPlan) -> torch.Tensor:
        """(B, L) channels each layer keeps: the plan's counts, clamped to the narrowest and
        widest widths (any policy; tau is not used)."""
        device = plan.counts.device
        low = torch.tensor(self.level_counts(0), device=device)
        high = torch.tensor(self._totals, device=device)
        return torch.minimum(torch.maximum(plan.counts, low), high)

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

    # --- execution and cost -------------------------------------------------------------

    def priority(self, layer: int, batch: int, device) -> torch.Tensor:
        """Fixed channel scores (B, C): earlier channels first. Slimmable has no gate."""
        total = self._totals[layer]
        return torch.linspace(1.0, 0.0, total, device=device).expand(batch, total)

    def run(self, x: torch.Tensor, plan: BudgetPlan):
        counts = self.width_counts(plan)
        masks = [prefix_mask(counts[:, i], t).to(x.dtype) for i, t in enumerate(self._totals)]
        scores = [self.priority(i, x.shape[0], x.device) for i in range(len(self._totals))]

        def keep(h: torch.Tensor, layer: int) -> torch.Tensor:
            return h * masks[layer][:, :, None, None]

        h = keep(F.relu(self.stem_bn(self.stem(x), counts[:, 0])), 0)
        for block in self.blocks:
            inner = keep(F.relu(block.bn1(block.conv1(h), counts[:, block.inner])), block.inner)
            out = block.bn2(block.conv2(inner), counts[:, block.out_stream])
            short = h if block.short_conv is None else \
                block.short_bn(block.short_conv(h), counts[:, block.out_stream])
            h = keep(F.relu(out + short), block.out_stream)
        return self.fc(h.mean((2, 3))), masks, scores

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1) -> Cost:
        """MACs of convolutions and the classifier at each sample's per-layer widths."""
        batch = masks[0].shape[0] if masks else batch
        device = masks[0].device if masks else None
        kept = kept_counts(masks, batch, device)
        if not masks:  # no masks: full width
            kept = torch.tensor([self._totals] * batch, device=device)
        h, w = height, width
        c0 = self.stem.out_channels
        dense = h * w * 27 * c0
        executed = h * w * 27 * kept[:, 0]
        for block in self.blocks:
            ho, wo = conv_out(h, block.stride), conv_out(w, block.stride)
            full_in, full_out = block.conv1.in_channels, block.conv1.out_channels
            cin, k, cout = kept[:, block.in_stream], kept[:, block.inner], kept[:, block.out_stream]
            dense += ho * wo * 9 * (full_in * full_out + full_out * full_out)
            executed = executed + ho * wo * 9 * (cin * k + k * cout)
            if block.short_conv is not None:
                dense += ho * wo * full_in * full_out
                executed = executed + ho * wo * cin * cout
            h, w = ho, wo
        dense += self.fc.in_features * self.fc.out_features
        executed = executed + kept[:, self.last_stream] * self.fc.out_features
        return Cost(dense, executed.long(), torch.zeros_like(executed).long(), kept,
                    self.gated_totals())


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
