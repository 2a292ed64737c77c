"""ACS FastNet: a wide, shallow CIFAR network built so that skipped channels pay at batch 1.

The backbone is the fast-training CIFAR-10 network of the airbench line of work: a frozen
2x2 patch-whitening convolution, then three blocks of conv 3x3 -> 2x2 max pool -> BN -> GELU
-> conv 3x3 -> BN -> GELU (64/256/256 channels by default), global max pooling and a linear
classifier scaled by 1/9. BatchNorm has a fixed scale of 1 (only its shift is learned), so it
folds into the convolution before it and commutes with the max pool.

Every 3x3 convolution is gated on its output channels, in blocks of `block` channels (16 by
default: a multiple of the CPU kernels' vector width, so a kept count never lands off the
kernels' tiles). A gated unit is one block: `gated_totals` counts blocks, masks are (B, blocks)
and costs count kept blocks. A skipped block is zero after its GELU, so the next convolution
reads only the kept blocks: skipping an output block of one layer also removes that input
block from the next. Gates read the convolution's input, as in ACS;
`gate` picks ACS-GN ("acs") or the FBS-style "cheap" gate, None gives the dense baseline.
`dgconv` makes the square 3x3 convolutions DGConv2d (ACS-DG).

Compact execution: every convolution has its BN folded in once (scale into the weight, shift
into a bias; the scale is positive, so BN commutes with the max pool). A gated layer gathers
the weight rows of its kept output blocks and the columns of the previous layer's kept
blocks; the gates read only the channels that exist. Samples that keep the same number of
blocks in a layer run as one grouped convolution; under `threshold` a batch runs the union
of its kept blocks as one plain convolution and zeros the blocks a sample did not keep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.dgconv import DGConv2d
from ..acs.gates import make_gate
from ..core.base import GatedNetwork
from ..core.folding import fold_conv_bn
from ..core.gather import block_channels, conv2d, conv3x3_gathered, linear_gathered, max_pool2x2
from ..core.registry import register_model
from ..core.units import ConvStem, Step, Tally, Trace, Unit, classifier_cost

WHITEN_KERNEL = 2


@dataclass(frozen=True)
class FastNetConfig:
    """Architecture of an (ACS) FastNet; gate None gives the dense baseline."""

    num_classes: int = 10
    widths: tuple[int, ...] = (64, 256, 256)
    gate: str | None = "cheap"
    block: int = 16
    dgconv: bool = False
    bn_momentum: float = 0.4
    head_scale: float = 1 / 9
    input_size: int = 32

    def __post_init__(self) -> None:
        if any(w % self.block for w in self.widths):
            raise ValueError(f"every width {self.widths} must be a multiple of block {self.block}")

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_scale_bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm whose scale stays 1 (not learned): only the shift is trained."""
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


def conv3x3(cin: int, cout: int, dgconv: bool) -> nn.Module:
    """A 3x3 convolution (DGConv2d when asked and square), identity (dirac) initialized."""
    if dgconv and cin == cout:
        conv = DGConv2d(cin, cout, 3)
    else:
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def conv_weight(conv: nn.Module) -> torch.Tensor:
    """The dense weight a 3x3 convolution computes with (DGConv: masked by its grouping)."""
    if isinstance(conv, DGConv2d):
        return conv.weight * conv.mask()[:, :, None, None]
    return conv.weight


def kept_blocks(keep: torch.Tensor) -> torch.Tensor | None:
    """(B, k) indices of the kept blocks (B, U) (equal counts), or None when all are kept."""
    kept = keep.nonzero()
    return None if kept.shape[0] == keep.numel() else kept[:, 1].view(keep.shape[0], -1)


class FastLayer(Unit):
    """A FastNet layer: conv (-> 2x2 max pool, a block's first) -> BN -> GELU, gated on its
    output channel blocks of `block` channels by a gate reading its input."""

    def __init__(self, conv: nn.Module, norm: nn.BatchNorm2d, gate: nn.Module | None, pool: bool,
                 block: int) -> None:
        self.conv, self.norm, self.gate, self.pool, self.block = conv, norm, gate, pool, block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.conv(h)
        if self.pool:
            h = F.max_pool2d(h, 2)
        return F.gelu(self.norm(h))

    def gated_layers(self) -> list[tuple[int, int]]:
        return [] if self.gate is None else [(self.norm.num_features // self.block, 1)]

    def reference(self, state: dict, trace: Trace) -> dict:
        h = state["h"]
        if self.gate is None:
            return {"h": self.forward(h)}
        m = trace.mask(self.gate(h))
        return {"h": self.forward(h) * m.repeat_interleave(self.block, 1)[:, :, None, None]}

    def cost(self, tally: Tally) -> None:
        """A kept output block reads only the previous layer's kept blocks."""
        h, w = tally.size
        cin, cout = tally.flow["channels"], self.norm.num_features
        dense = 9 * h * w * self.conv.weight.shape[1] * cout
        if self.gate is None:
            tally.add(dense, 9 * h * w * cin * cout)
        else:
            cout = tally.kept[:, tally.next()] * self.block
            tally.add(dense, 9 * h * w * cin * cout, self.gate.macs(cin, h, w))
        tally.flow["channels"] = cout
        if self.pool:
            tally.size = h // 2, w // 2

    def steps(self) -> list[Step]:
        if (self.norm.weight <= 0).any():
            raise ValueError("a FastNet BN scale must be positive to commute with max pooling")
        weight, bias = (t.contiguous() for t in fold_conv_bn(conv_weight(self.conv), self.norm))
        channels = torch.arange(weight.shape[0], device=weight.device).view(-1, self.block)

        def apply(state: dict, keep) -> dict:
            blocks = None if keep is None else kept_blocks(keep)
            rows = None if blocks is None else block_channels(blocks, channels)
            h = conv3x3_gathered(state["h"], weight, bias, self.block, rows, state.get("blocks"))
            if self.pool:
                h = max_pool2x2(h)
            return {"h": F.gelu(h), "blocks": blocks, "index": rows}

        if self.gate is None:
            return [Step(apply)]
        return [Step(apply, gate=lambda state: self.gate(state["h"], state.get("index")),
                     zero=self._zero)]

    def _zero(self, state: dict, own: torch.Tensor) -> dict:
        """Zero each sample's blocks outside its own keep `own` (B, kept blocks of the pass)."""
        mask = own.repeat_interleave(self.block, 1).to(state["h"].dtype)
        return {**state, "h": state["h"] * mask[:, :, None, None]}


class FastHead(Unit):
    """Global max pool -> linear classifier, scaled; reads only the last layer's kept blocks."""

    def __init__(self, head: nn.Linear, scale: float) -> None:
        self.head, self.scale = head, scale

    def reference(self, state: dict, trace: Trace) -> dict:
        return {"logits": self.head(state["h"].amax((2, 3))) * self.scale}

    def cost(self, tally: Tally) -> None:
        classifier_cost(tally, self.head)

    def steps(self) -> list[Step]:
        def apply(state: dict, keep) -> dict:
            h = state["h"]
            pooled = h.amax((2, 3)) if h.shape[1] else h.new_zeros(h.shape[0], 0)
            return {"logits": linear_gathered(pooled, self.head.weight, state.get("index"))
                    * self.scale}
        return [Step(apply)]


class FastVariant(nn.Module):
    """One width level of a FastNet as a dense module: BN folded, weights sliced to the
    level's channel prefixes (what a runtime compiles). It pools with two element-wise maxima
    (`max_pool2x2`): OpenVINO 2026.4's float32 CPU plugin fuses MaxPool -> GELU wrongly (up
    to 0.17 off after the first block, 2.5 points of top-1 lost); this costs it about 5%."""

    def __init__(self, net: FastNet, counts: list[int]) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, net.whiten.out_channels, net.whiten.kernel_size, bias=True)
        self.whiten.load_state_dict(net.whiten.state_dict())
        self.pools = [i % 2 == 0 for i in range(len(net.convs))]
        self.convs = nn.ModuleList()
        cin = net.whiten.out_channels
        for conv, norm, cout in zip(net.convs, net.norms, counts, strict=True):
            weight = conv_weight(conv)[:cout, :cin]
            scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps))[:cout]
            layer = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
            layer.weight.data = (weight * scale[:, None, None, None]).detach().clone()
            layer.bias.data = (norm.bias[:cout] - norm.running_mean[:cout] * scale).detach().clone()
            self.convs.append(layer)
            cin = cout
        self.head = nn.Linear(cin, net.head.out_features, bias=False)
        self.head.weight.data = (net.head.weight[:, :cin] * net.config.head_scale).detach().clone()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.whiten(x))
        for conv, pool in zip(self.convs, self.pools, strict=True):
            h = conv(h)
            if pool:
                h = max_pool2x2(h)
            h = F.gelu(h)
        return self.head(h.amax((2, 3)))


class FastNet(GatedNetwork):
    architecture = "fastnet"
    config_class = FastNetConfig

    def __init__(self, config: FastNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        whiten = 2 * 3 * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(3, whiten, WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        convs, norms, gates, cin = [], [], [], whiten
        for width in config.widths:
            for c_in in (cin, width):
                convs.append(conv3x3(c_in, width, config.dgconv))
                norms.append(fixed_scale_bn(width, config.bn_momentum))
                gates.append(make_gate(config.gate, c_in, width // config.block))
            cin = width
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.gates = nn.ModuleList(gates) if config.gate else None
        self.head = nn.Linear(cin, config.num_classes, bias=False)

    @property
    def min_input_size(self) -> int:
        return WHITEN_KERNEL - 1 + 2 ** len(self.config.widths)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen whitening filters from normalized images (N, 3, H, W): the 2x2
        patches' covariance eigenvectors scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
        k = WHITEN_KERNEL
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)
        patches = patches.transpose(1, 3).reshape(-1, 3 * k * k)
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        values, vectors = torch.linalg.eigh(covariance)
        filters = (vectors.T / torch.sqrt(values + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def stem(self) -> ConvStem:
        whiten = self.whiten
        return ConvStem(whiten, lambda x: F.gelu(whiten(x)),
                        compact=lambda x: F.gelu(conv2d(x, whiten.weight, whiten.bias, padding=0)))

    def variants(self) -> list[nn.Module] | None:
        """The dense baseline as one dense module (BN folded), for a runtime to compile."""
        if self.gates:
            return None
        return [FastVariant(self, [w for w in self.config.widths for _ in range(2)]).eval()]

    def units(self) -> list[Unit]:
        stem = self.stem()
        gates = self.gates or [None] * len(self.convs)
        layers = [FastLayer(conv, norm, gate, i % 2 == 0, self.config.block)
                  for i, (conv, norm, gate) in enumerate(zip(self.convs, self.norms, gates, strict=True))]
        return [stem, *layers, FastHead(self.head, self.config.head_scale)]

SMOKE = {"widths": (16, 32, 32)}  # a small instance, for the contract tests


@register_model(FastNet, smoke=SMOKE)
def acs_fastnet(num_classes: int = 10, gate: str | None = "cheap", **kwargs) -> FastNet:
    """ACS FastNet (64/256/256, cheap gates on blocks of 16 channels)."""
    return FastNet(FastNetConfig(num_classes=num_classes, gate=gate, **kwargs))


@register_model(FastNet, smoke=SMOKE)
def fastnet(num_classes: int = 10, **kwargs) -> FastNet:
    """The dense baseline: the same backbone and code with the gates off."""
    return FastNet(FastNetConfig(num_classes=num_classes, gate=None, **kwargs))
