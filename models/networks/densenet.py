"""ACS DenseNet: a DenseNet whose dense layers each have a gate over their growth channels.

As in the ACS paper's code: growth 32, bn_size 2, 64 initial features, blocks (6, 6, 6) for
DenseNet-40, with a CIFAR stem (3x3 conv) and adaptive pooling. The transition pools before
its 1x1 convolution (the same function as conv-then-pool, a quarter of the MACs).

A skipped growth channel is 0; after the consumer's BN+ReLU it is a constant, so later 1x1
convolutions and the classifier fold it into a bias. A layer with every channel skipped
skips its 1x1 convolution too.

Compact execution: each dense block writes into one preallocated concatenation buffer that
holds only the channels computed so far (`present`, ascending global indices), beside a
buffer of their spatial means (what a cheap gate reads, so it never re-pools the whole
concatenation). A consumer's BN+ReLU maps a skipped (zero) channel to the constant
relu(shift); its 1x1 convolution (or the classifier) reads only the present channels and
folds the skipped ones' constants into its bias. BN after a convolution is folded into its
weights once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.gates import ACSGate, CheapGate, make_gate
from ..core.base import GatedNetwork
from ..core.folding import bn_affine, bn_stats
from ..core.gather import conv1x1_gathered, conv_rows_gathered, gather_rows, linear_gathered
from ..core.registry import register_model
from ..core.units import ConvStem, Step, Tally, Trace, Unit, classifier_cost


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


class _Consumer:
    """BN -> ReLU -> [pool] -> linear map over a block's present channels; the skipped
    channels' constants are folded into the bias."""

    def __init__(self, bn, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pool=None) -> None:
        self.stats, self.eps = bn_stats(bn), bn.eps
        self.const = F.relu(bn_affine(bn)[1])
        self.weight = weight.detach()
        self.weight_t = self.weight.T.contiguous()  # (C, O): present channels gather as rows
        self.bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
        self.full_bias = self.bias + self.weight @ self.const  # every channel skipped
        self.channels = weight.shape[1]
        self.pool = pool or (lambda y: y)

    def __call__(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, n = present.shape
        if n == self.channels:  # every channel present, in order
            y = self.pool(F.batch_norm(x, *self.stats, False, 0.0, self.eps).relu_())
            return _linear(y, self.weight, self.bias)
        if b == 1:
            p = present[0]
            y = F.batch_norm(x, *self.stats.index_select(1, p), False, 0.0, self.eps).relu_()
            weight_t = self.weight_t.index_select(0, p)
            bias = self.full_bias - self.const.index_select(0, p) @ weight_t
            return _linear(self.pool(y), weight_t.T, bias)
        mean, var, weight, bias = gather_rows(self.stats.T, present).permute(2, 0, 1)
        scale = weight / torch.sqrt(var + self.eps)
        shift = bias - mean * scale
        y = self.pool(torch.mul(x, scale[..., None, None]).add_(shift[..., None, None]).relu_())
        skipped = self.const.expand(b, -1).scatter(1, present, 0.0)
        bias = self.bias + skipped @ self.weight.T
        if y.dim() == 2:
            return linear_gathered(y, self.weight, present, bias)
        return conv1x1_gathered(y, self.weight, present, bias)


def _linear(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """weight (O, n) applied to y (B, n) or, as a 1x1 convolution, to y (B, n, H, W)."""
    if y.dim() == 2:
        return torch.addmm(bias, y, weight.T)
    b, n, h, w = y.shape
    if b == 1:
        return torch.addmm(bias[:, None], weight, y.reshape(n, h * w)).reshape(1, -1, h, w)
    return F.conv2d(y, weight[:, :, None, None], bias)


def _pool2(y: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; several times faster on channels-last tensors on the CPU."""
    return F.avg_pool2d(y.contiguous(memory_format=torch.channels_last), 2).contiguous()


def _global_pool(y: torch.Tensor) -> torch.Tensor:
    return y.mean((2, 3))


class _GateScores:
    """A gate's scores read off the block state: only present channels, pooled means cached."""

    def __init__(self, gate) -> None:
        self.gate = gate
        if isinstance(gate, CheapGate):
            self.weight, self.bias = gate.fc.weight.detach(), gate.fc.bias.detach()

    def __call__(self, state: dict) -> torch.Tensor:
        present = state["present"]
        n = present.shape[1]
        if isinstance(self.gate, CheapGate):
            means = state["means"][:, :n]
            if present.shape[0] == 1:
                weight = self.weight if n == self.weight.shape[1] else \
                    self.weight.index_select(1, present[0])
                return torch.sigmoid(torch.addmm(self.bias, means, weight.T))
            return torch.sigmoid(linear_gathered(means, self.weight, present, self.bias))
        assert isinstance(self.gate, ACSGate)
        index = None if n == self.gate.reduce.in_channels else present
        return self.gate(state["buf"][:, :n], index=index)


class DenseLayer(nn.Module, Unit):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv producing `growth` channels, with an optional gate;
    its output is concatenated to its input."""

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

    def gated_layers(self) -> list[tuple[int, int]]:
        return [] if self.gate is None else [(self.conv2.out_channels, 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        h = state["h"]
        out = self(h)
        if self.gate is not None:
            out = out * trace.mask(self.gate(h))[:, :, None, None]
        return {"h": torch.cat([h, out], 1)}

    def cost(self, tally: Tally) -> None:
        """The gate reads the channels present; the 1x1 runs unless every channel is skipped."""
        h, w = tally.size
        present = tally.flow["channels"]  # per sample, or one int for all
        width, growth = self.conv1.out_channels, self.conv2.out_channels
        dense = h * w * width * (self.conv1.in_channels + 9 * growth)
        if self.gate is None:
            k = growth
            tally.add(dense, h * w * width * (present + 9 * k))
        else:
            k = tally.kept[:, tally.next()]
            tally.add(dense, h * w * width * ((k > 0) * present + 9 * k),
                      self.gate.macs(present, h, w))
        tally.flow["channels"] = present + k

    def steps(self) -> list[Step]:
        apply = self._compact()
        if self.gate is None:
            return [Step(apply)]
        return [Step(apply, gate=_GateScores(self.gate), zero=_zero_skipped)]

    def _compact(self):
        """(state, keep) -> state. keep: None (all), (B, growth) with equal counts, or
        (1, growth) shared by the batch (a union pass); `present` is likewise (B, n) or (1, n)
        shared."""
        scale2, shift2 = bn_affine(self.norm2)
        consumer = _Consumer(self.norm1, self.conv1.weight[:, :, 0, 0] * scale2[:, None], shift2)
        weight2 = self.conv2.weight.detach()
        growth = weight2.shape[0]
        all_rows = torch.arange(growth)
        base = self.conv1.in_channels

        def apply(state: dict, keep) -> dict:
            buf, means, present = state["buf"], state["means"], state["present"]
            n = present.shape[1]
            if keep is None or keep.all():
                rows = all_rows.to(buf.device)[None]
            else:
                rows = keep.nonzero()[:, 1].reshape(keep.shape[0], -1)
                if rows.shape[1] == 0:
                    return state
            k = rows.shape[1]
            h = consumer(buf[:, :n], present).relu_()
            out = conv_rows_gathered(h, weight2, None if k == growth else rows, padding=1)
            buf[:, n : n + k] = out
            means[:, n : n + k] = out.mean((2, 3))
            if rows.shape[0] != present.shape[0]:  # one is shared, the other per sample
                rows, present = rows.expand(buf.shape[0], -1), present.expand(buf.shape[0], -1)
            return {"buf": buf, "means": means, "present": torch.cat([present, base + rows], 1)}
        return apply


def _zero_skipped(state: dict, own: torch.Tensor) -> dict:
    """Zero each sample's new channels outside its own keep `own` (B, kept of the union):
    a zero channel is what a skipped one is to every consumer (BN+ReLU -> a constant)."""
    n, k = state["present"].shape[1], own.shape[1]
    mask = own.to(state["buf"].dtype)
    state["buf"][:, n - k : n] *= mask[:, :, None, None]
    state["means"][:, n - k : n] *= mask
    return state


class BlockStart(Unit):
    """Where a dense block begins: the compact state's concatenation buffer for the block's
    `total` channels (the reference concatenates as it goes; no MACs)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def reference(self, state: dict, trace: Trace) -> dict:
        return state

    def cost(self, tally: Tally) -> None:
        pass

    def steps(self) -> list[Step]:
        total = self.total

        def apply(state: dict, keep) -> dict:
            h = state["h"]
            b, c, height, width = h.shape
            buf = h.new_empty(b, total, height, width)
            buf[:, :c] = h
            means = h.new_empty(b, total)
            means[:, :c] = h.mean((2, 3))
            present = torch.arange(c, device=h.device)[None]  # shared by the batch
            return {"buf": buf, "means": means, "present": present}
        return [Step(apply)]


class Transition(nn.Module, Unit):
    """BN-ReLU-2x2 average pool-1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.avg_pool2d(F.relu(self.norm(x)), 2))

    def reference(self, state: dict, trace: Trace) -> dict:
        return {"h": self(state["h"])}

    def cost(self, tally: Tally) -> None:
        h, w = tally.size[0] // 2, tally.size[1] // 2
        tally.add(h * w * self.conv.in_channels * self.conv.out_channels,
                  h * w * tally.flow["channels"] * self.conv.out_channels)
        tally.size = h, w
        tally.flow["channels"] = self.conv.out_channels

    def steps(self) -> list[Step]:
        consumer = _Consumer(self.norm, self.conv.weight[:, :, 0, 0], pool=_pool2)

        def apply(state: dict, keep) -> dict:
            present = state["present"]
            return {"h": consumer(state["buf"][:, : present.shape[1]], present)}
        return [Step(apply)]


class DenseHead(Unit):
    """BN-ReLU-global average pool-classifier over the last block's channels."""

    def __init__(self, norm: nn.BatchNorm2d, classifier: nn.Linear) -> None:
        self.norm, self.classifier = norm, classifier

    def reference(self, state: dict, trace: Trace) -> dict:
        return {"logits": self.classifier(_global_pool(F.relu(self.norm(state["h"]))))}

    def cost(self, tally: Tally) -> None:
        classifier_cost(tally, self.classifier)

    def steps(self) -> list[Step]:
        consumer = _Consumer(self.norm, self.classifier.weight, self.classifier.bias,
                             pool=_global_pool)

        def apply(state: dict, keep) -> dict:
            present = state["present"]
            return {"logits": consumer(state["buf"][:, : present.shape[1]], present)}
        return [Step(apply)]


class ACSDenseNet(GatedNetwork):
    architecture = "densenet"
    config_class = DenseNetConfig

    def __init__(self, config: DenseNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        c = config.init_features
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, depth in enumerate(config.blocks):
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

    def units(self) -> list[Unit]:
        units: list[Unit] = [ConvStem(self.stem, self.stem)]
        for i, block in enumerate(self.blocks):
            units += [BlockStart(block[-1].conv1.in_channels + self.config.growth), *block]
            if i < len(self.transitions):
                units.append(self.transitions[i])
        return units + [DenseHead(self.norm, self.classifier)]

SMOKE = {"growth": 8, "init_features": 16, "blocks": (2, 2, 2)}  # a small instance, for the contract tests


@register_model(ACSDenseNet, smoke=SMOKE)
def acs_densenet40(num_classes: int = 10, gate: str | None = "acs", **kwargs) -> ACSDenseNet:
    """ACS DenseNet-40 as in the paper's code, with an ACS-GN gate ('acs') per dense layer."""
    return ACSDenseNet(DenseNetConfig(num_classes=num_classes, gate=gate, **kwargs))


@register_model(ACSDenseNet, smoke=SMOKE)
def densenet40(num_classes: int = 10, **kwargs) -> ACSDenseNet:
    """The dense baseline: the same backbone and code with the gates off."""
    return ACSDenseNet(DenseNetConfig(num_classes=num_classes, gate=None, **kwargs))
