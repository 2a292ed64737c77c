"""Dynamic fractional skipping (DFS, Shen et al., AAAI 2020): per residual block, a gate
chooses to skip the block or to run it at one of several bit-widths.

Each gated block (every block whose shortcut is the identity) has a gate (global average
pool -> FC -> sigmoid) that scores its precision levels 1..K, level k running the block with
weights and activations fake-quantized to `bits[k-1]` bits (8 to 16; weights symmetric per
output channel, activations unsigned per sample, both with straight-through gradients);
level 0 skips the block (its output is its input). Scores are made non-increasing along the
levels (a cumulative minimum), so a block's mask over its K levels is a prefix
("thermometer"): the kept count is the level. The downsampling blocks (those with a 1x1
projection shortcut) are not gated and always run at the highest bit-width; the stem, the
projection shortcuts, the gates and the classifier run in full precision (32-bit).

Cost. MACs at reduced precision are still MACs: `Cost.executed` counts every executed
block in full, and only skipped blocks save MACs. The paper's figure is in bit-operations,
BitOps = MACs x weight bits x activation bits, reported as `DFSCost.bitops` and labelled
`BITOPS_LABEL`.

Execution. Torch runs the levels fake-quantized (no saving). The 8-bit level can run in
int8 for real: `acs-train calibrate` sets static activation ranges per gated block
(`recalibrate`; the eval reference then quantizes 8 bits with them, per sample otherwise),
and each step's kernels (`DFSKernel`: the block at one level as a module of FakeQuantize
ops) compile in OpenVINO to int8 convolutions (`models.engines.stepwise`); 12 and 16 bits
have no integer kernels and run in float there.

Budget -> target computation percentage, in BitOps (`budget_unit = "bitops"`): the fraction
of the BitOps of the network's most expensive configuration (every gated block at the
highest bit-width, everything else at 32 bits, gates included; budget 1.0 runs it). The
floor is every gated block skipped. Policies, on the thermometer scores:
- threshold: a block runs at the highest level whose score is >= tau(b) (input-adaptive).
- topk: every block runs at its table level counts_l(b) (the same BitOps for every request).
- cap: threshold, but never above the topk level, so BitOps never exceed the budget.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import DenseForward, Gate, GatedNetwork
from ..core.budget import (
    GRID_STEP,
    CalibrationTable,
    PrefixPlan,
    budget_grid,
    largest_within,
    prefix_mask,
    uniform_tau,
)
from ..core.macs import Cost, conv_out
from ..core.registry import register_model
from ..core.units import Kernels, Step, Tally, Trace, Unit
from .cifar_resnet import build_resnet, resnet_units

FULL_BITS = 32
INT8_BITS = 8  # the bit-width that runs in int8 where the runtime has int8 kernels
BITOPS_LABEL = "BitOps (8-bit blocks run in int8 on OpenVINO, 12/16-bit in float)"


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform fake quantization per output channel: 2^bits - 1 levels in
    [-max|w|, max|w|]; straight-through gradient. A FakeQuantize op, which OpenVINO runs
    as integer weights."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = (w.detach().abs().amax(tuple(range(1, w.dim()))) / qmax).clamp(min=torch.finfo(w.dtype).tiny)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax).to(weight.dtype)


def quantize_activation(x: torch.Tensor, bits: int, limit: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned uniform fake quantization of non-negative (post-ReLU) activations, 2^bits
    levels; straight-through gradient. Per sample (dynamic range [0, max of the sample]), or
    with a calibrated static range [0, limit] (values above it saturate): a FakeQuantize op,
    which OpenVINO runs in int8 at 8 bits."""
    qmax = 2**bits - 1
    if limit is not None:
        scale = (limit.float() / qmax).clamp(min=torch.finfo(torch.float32).tiny)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, torch.zeros((), dtype=torch.int32,
                                                     device=x.device), 0, qmax).to(x.dtype)
    v = x.detach()
    scale = v.amax(tuple(range(1, v.dim())), keepdim=True) / qmax
    scale = scale.clamp(min=torch.finfo(v.dtype).tiny)
    q = (v / scale).round().clamp(0, qmax) * scale
    return q + (x - v)  # exactly q forward; gradient 1 backward


@dataclass(frozen=True)
class DFSResNetConfig:
    """A CIFAR ResNet (basic blocks) with DFS gates; gate False gives the full-precision
    dense baseline."""

    num_classes: int = 10
    blocks: tuple[int, ...] = (6, 6, 6)
    widths: tuple[int, ...] = (16, 32, 64)
    bits: tuple[int, ...] = (8, 12, 16)
    gate: bool = True
    input_size: int = 32

    def __post_init__(self) -> None:
        bits = self.bits
        if not bits or any(not 8 <= b <= 16 for b in bits) or any(b2 <= b1 for b1, b2 in
                                                                  zip(bits, bits[1:], strict=False)):
            raise ValueError(f"bits {bits} must increase, each from 8 to 16")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DFSCost(Cost):
    """Cost of a DFS forward pass: MACs (the base fields) and BitOps.

    `bitops` (B,): executed BitOps; `bitops_dense`: the most expensive configuration's (the
    budget's reference); `bitops_fp32`: the full-precision network's (no gates)."""

    bitops: torch.Tensor | None = None
    bitops_dense: int = 0
    bitops_fp32: int = 0
    bitops_label: str = BITOPS_LABEL

    @property
    def bitops_ratio(self) -> torch.Tensor:
        """Executed BitOps over the most expensive configuration's (what the budget bounds)."""
        return self.bitops.double() / self.bitops_dense


class DFSTally(Tally):
    """The cost walk's sums, with BitOps: each part at its bit-width (`bits`, per sample
    where it varies), the most expensive configuration's at `dense_bits`, gates at 32."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.bitops = torch.zeros_like(self.executed)
        self.bitops_dense = 0

    def add(self, dense: int, executed=None, gate=0, bits=FULL_BITS, dense_bits=None) -> None:
        super().add(dense, executed, gate)
        ran = dense if executed is None else executed
        self.bitops += ran * bits**2 + gate * FULL_BITS**2
        self.bitops_dense += dense * (bits if dense_bits is None else dense_bits) ** 2
        self.bitops_dense += gate * FULL_BITS**2

    def cost(self, totals: list[int]) -> DFSCost:
        return DFSCost(self.dense, self.executed, self.gates, self.kept, totals, self.bitops,
                       int(self.bitops_dense), self.dense * FULL_BITS**2)


class DFSGate(Gate):
    """Global average pool -> FC -> sigmoid, made non-increasing over the K levels."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, levels)
        nn.init.constant_(self.fc.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x.mean((2, 3)))).cummin(1).values

    def macs(self) -> int:
        return self.fc.in_features * self.fc.out_features


class DFSBlock(nn.Module, Unit):
    """Basic block, runnable in full precision or fake-quantized to a bit-width; gated
    (levels 0..len(bits)) where `bits` is given and the shortcut is the identity."""

    def __init__(self, cin: int, cout: int, stride: int, bits: tuple[int, ...] | None) -> None:
        super().__init__()
        self.stride = stride
        self.bits = bits
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.gate = DFSGate(cin, len(bits)) if bits and self.shortcut is None else None
        # bit-width of an ungated block: the highest in a gated network, else 32
        self.fixed_bits = bits[-1] if bits and self.gate is None else None
        if self.gate is not None:  # static ranges of the 8-bit level's two activations (0: none)
            self.register_buffer("act_limit", torch.zeros(2))

    def limits(self, bits: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The static activation ranges at `bits`: calibrated ones at 8 bits in eval mode,
        else none (per-sample ranges)."""
        calibrated = getattr(self, "act_limit", None)
        if bits != INT8_BITS or self.training or calibrated is None or not calibrated.all():
            return None, None
        return calibrated[0], calibrated[1]

    def branch(self, x: torch.Tensor, bits: int | None = None,
               weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The residual branch in full precision (bits None) or fake-quantized to `bits`;
        `weights`: the two already-quantized convolution weights, if at hand."""
        w1, w2 = weights or (self.conv1.weight, self.conv2.weight)
        limit1, limit2 = self.limits(bits)
        if bits is not None:
            x = quantize_activation(x, bits, limit1)
            if weights is None:
                w1 = quantize_weight(w1, bits)
        h = F.relu(self.bn1(F.conv2d(x, w1, None, self.stride, 1)))
        if bits is not None:
            h = quantize_activation(h, bits, limit2)
            if weights is None:
                w2 = quantize_weight(w2, bits)
        return self.bn2(F.conv2d(h, w2, None, 1, 1))

    def full(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """The block, branch + shortcut, with the branch at `bits` (None: at `fixed_bits`,
        full precision where that is None too)."""
        short = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.branch(x, self.fixed_bits if bits is None else bits) + short)

    def gated_layers(self) -> list[tuple[int, int]]:
        return [] if self.gate is None else [(len(self.bits), 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        """Each level present in the batch (all in training, for the straight-through
        gradients) runs on the whole batch; each sample takes its level's output (level 0:
        the input)."""
        h = state["h"]
        if self.gate is None:
            return {"h": self.full(h)}
        s = self.gate(h)
        k = len(self.bits)
        level = trace.keep(s).sum(1)
        m = trace.record(prefix_mask(level, k), s)
        # one-hot of the level from the thermometer mask: m_j - m_{j+1}
        onehot = m - torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)
        present = range(1, k + 1) if self.training else sorted(set(level.tolist()) - {0})
        branch = torch.zeros_like(h)
        for j in present:
            branch = branch + onehot[:, j - 1, None, None, None] * self.branch(h, self.bits[j - 1])
        return {"h": F.relu(h + branch)}

    def cost(self, tally: Tally) -> None:
        """MACs (a skipped block saves its MACs; quantization saves none) and BitOps."""
        h, w = tally.size
        ho, wo = conv_out(h, self.stride), conv_out(w, self.stride)
        cin, cout = self.conv1.in_channels, self.conv1.out_channels
        body = ho * wo * 9 * (cin * cout + cout * cout)
        if self.gate is None:
            tally.add(body, bits=self.fixed_bits or FULL_BITS)
            if self.shortcut is not None:
                tally.add(ho * wo * cin * cout)
        else:
            level = tally.kept[:, tally.next()]
            bits = torch.tensor([0, *self.bits], device=tally.device)[level]
            tally.add(body, (level > 0) * body, self.gate.macs(), bits, self.bits[-1])
        tally.size = ho, wo

    def steps(self) -> list[Step]:
        """A skipped block is not computed; an executed one runs at its level's bit-width
        with weights quantized once (the operations of the reference: the same numbers).
        Kernels: the block at each level as a module (`DFSKernel`)."""
        if self.gate is None:
            return [Step(lambda state, keep: {"h": self.full(state["h"])}, kernels=Kernels(self.kernels()))]
        weights = [(quantize_weight(self.conv1.weight, b), quantize_weight(self.conv2.weight, b))
                   for b in self.bits]

        def apply(state: dict, keep) -> dict:
            level = int(keep[0].sum())
            if level == 0:
                return state  # skipped: not computed
            h = state["h"]
            return {"h": F.relu(h + self.branch(h, self.bits[level - 1], weights[level - 1]))}
        return [Step(apply, gate=lambda state: self.gate(state["h"]), kernels=Kernels(self.kernels()),
                     merges=True)]

    def kernels(self) -> list[DFSKernel | None]:
        """The block at each level as a module (`DFSKernel`; None: skipped), one float kernel
        for every level above 8 bits; an ungated block: its one kernel."""
        in_float = DFSKernel(self, None)
        if self.gate is None:
            return [in_float]
        return [None, *(DFSKernel(self, b) if b == INT8_BITS else in_float for b in self.bits)]


class DFSKernel(nn.Module):
    """A block at one level as a plain module (h -> h) for a compiling runtime: at 8 bits
    quantized as the reference does (static ranges, FakeQuantize ops: int8 kernels in
    OpenVINO), otherwise in float (no 12- or 16-bit integer kernels exist; within 2^-12 of
    the reference's fake quantization)."""

    def __init__(self, block: DFSBlock, bits: int | None) -> None:
        super().__init__()
        self.block, self.bits = block, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.full(x, self.bits)


class DFSResNet(GatedNetwork):
    """CIFAR ResNet with dynamic fractional skipping; see the module docstring."""

    architecture = "dfs_resnet"
    config_class = DFSResNetConfig
    tally_class = DFSTally
    budget_unit = "bitops"

    def __init__(self, config: DFSResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        bits = config.bits if config.gate else None
        build_resnet(self, config.blocks, config.widths, config.num_classes,
                     lambda cin, cout, stride: DFSBlock(cin, cout, stride, bits))

    @property
    def levels(self) -> int:
        return len(self.config.bits)

    def gated_blocks(self) -> list[DFSBlock]:
        return [block for block in self.blocks if block.gate is not None]

    def units(self) -> list[Unit]:
        return resnet_units(self)

    def variants(self) -> list[nn.Module] | None:
        """The dense baseline (gates off) compiles whole; a gated network runs its steps."""
        return None if self.config.gate else [DenseForward(self).eval()]

    @torch.no_grad()
    def recalibrate(self, batches) -> int:
        """The static activation ranges of every gated block's 8-bit level (what int8 kernels
        need): the mean over images of each image's maximum (OpenVINO's default estimator) of
        the block's input and of its inner activation, every block at its highest level."""
        blocks = self.gated_blocks()
        if not blocks:
            return 0
        sums, images, count = torch.zeros(len(blocks), 2), 0, 0
        self.eval()
        for x in batches:
            h = F.relu(self.stem_bn(self.stem(x)))
            for block in self.blocks:
                if block.gate is None:
                    h = block.full(h)
                    continue
                inner = F.relu(block.bn1(F.conv2d(quantize_activation(h, INT8_BITS),
                                                  quantize_weight(block.conv1.weight, INT8_BITS),
                                                  None, block.stride, 1)))
                i = blocks.index(block)
                sums[i] += torch.stack([h.amax((1, 2, 3)).sum(), inner.amax((1, 2, 3)).sum()]).cpu()
                h = F.relu(h + block.branch(h, block.bits[-1]))
            images, count = images + x.shape[0], count + 1
        for block, total in zip(blocks, sums, strict=True):
            block.act_limit.copy_(total / max(images, 1))
        return count

    def calibrated_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.endswith("act_limit")}

    # --- budget mapping (BitOps) ---------------------------------------------------------

    def plan(self, budget, policy: str, batch: int, device) -> PrefixPlan:
        return PrefixPlan.resolve(self.table, budget, policy, batch, device)

    def budget_ratio(self, cost: DFSCost) -> torch.Tensor:
        """The per-sample figure the budget bounds: the BitOps ratio."""
        return cost.bitops_ratio

    def bitops_ratio(self, levels: list[int], height: int | None = None, width: int | None = None) -> float:
        """BitOps ratio of one sample running gated block l at level levels[l]."""
        return float(self.count_cost(levels, height, width).bitops_ratio[0])

    def floor(self) -> float:
        """BitOps ratio with every gated block skipped, at the native input size."""
        return self.bitops_ratio([0] * len(self.gated_blocks()))

    def uniform_table(self, step: float = GRID_STEP) -> CalibrationTable:
        """A data-free table in BitOps: blocks are raised one level at a time, first block
        first, all to the lowest bit-width before any goes higher; each budget gets the
        largest such configuration whose BitOps ratio is <= it. tau = 1 - levels kept/all
        (TAU_CLOSED for none)."""
        n, k = len(self.gated_blocks()), self.levels
        if n == 0:
            return CalibrationTable([1.0], [0.0], [[]], 1.0, "dense")
        ladder = [[min(k, (i + n - 1 - j) // n) for j in range(n)] for i in range(n * k + 1)]

        @functools.cache
        def cost(i: int) -> float:
            return self.bitops_ratio(ladder[i])

        floor = cost(0)
        budgets = budget_grid(floor, step)
        best = [largest_within(cost, len(ladder), b) for b in budgets]
        taus = [round(uniform_tau(i / (n * k)), 6) for i in best]
        return CalibrationTable(budgets, taus, [ladder[i] for i in best], floor, "uniform",
                                {"budget_unit": BITOPS_LABEL, "bits": list(self.config.bits)})


SMOKE = {"blocks": (2, 2), "widths": (8, 16), "bits": (8, 16)}  # a small instance, for the contract tests


@register_model(DFSResNet, smoke=SMOKE)
def dfs_resnet38(num_classes: int = 10, **kwargs) -> DFSResNet:
    """DFS ResNet-38 (3 stages of 6 basic blocks, 16/32/64 channels), bits 8/12/16."""
    return DFSResNet(DFSResNetConfig(num_classes=num_classes, **kwargs))


@register_model(DFSResNet, smoke=SMOKE)
def resnet38(num_classes: int = 10, **kwargs) -> DFSResNet:
    """The full-precision dense baseline: ResNet-38, the same code with the gates off."""
    return DFSResNet(DFSResNetConfig(num_classes=num_classes, gate=False, **kwargs))
