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
block from the next (see compact_fastnet.py). Gates read the convolution's input, as in ACS;
`gate` picks ACS-GN ("acs") or the FBS-style "cheap" gate, None gives the dense baseline.
`dgconv` makes the square 3x3 convolutions DGConv2d (ACS-DG).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acs.dgconv import DGConv2d
from ..acs.gates import make_gate
from ..core.base import GatedNetwork
from ..core.budget import BudgetPlan
from ..core.macs import Cost, kept_counts
from ..core.registry import register_model

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


class FastNet(GatedNetwork):
    architecture = "fastnet"
    config_class = FastNetConfig
    executor = "fastnet_compact.CompactFastNet"

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
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
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

    def gated_totals(self) -> list[int]:
        if self.gates is None:
            return []
        return [norm.num_features // self.config.block for norm in self.norms]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.whiten(x))

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Gated layer i without its mask: conv (-> max pool for a block's first) -> BN -> GELU."""
        h = self.convs[i](h)
        if i % 2 == 0:
            h = F.max_pool2d(h, 2)
        return F.gelu(self.norms[i](h))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h.amax((2, 3))) * self.config.head_scale

    def run(self, x: torch.Tensor, plan: BudgetPlan):
        masks, scores = [], []
        h = self.stem(x)
        for i in range(len(self.convs)):
            if self.gates is None:
                h = self.layer(i, h)
                continue
            s = self.gates[i](h)
            m = self.straight_through(plan.select(i, s), s)
            h = self.layer(i, h) * m.repeat_interleave(self.config.block, 1)[:, :, None, None]
            masks.append(m)
            scores.append(s)
        return self.classify(h), masks, scores

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Output (height, width) of every 3x3 convolution (before its pool)."""
        h, w = height - WHITEN_KERNEL + 1, width - WHITEN_KERNEL + 1
        out = []
        for i in range(len(self.convs)):
            out.append((h, w))
            if i % 2 == 0:
                h, w = h // 2, w // 2
        return out

    def macs(self, masks: list[torch.Tensor], height: int, width: int, batch: int = 1) -> Cost:
        """Executed MACs as one product of kept widths per layer (a few tensor ops at any batch)."""
        cfg = self.config
        batch = masks[0].shape[0] if masks else batch
        device = masks[0].device if masks else None
        kept = kept_counts(masks, batch, device)
        widths = [norm.num_features for norm in self.norms]
        cin_dense = [self.whiten.out_channels, *widths[:-1]]
        sizes = self.sizes(height, width)
        per_pixel = [9 * h * w for h, w in sizes]
        stem_pixels = (height - WHITEN_KERNEL + 1) * (width - WHITEN_KERNEL + 1)
        stem = stem_pixels * cin_dense[0] * 3 * WHITEN_KERNEL**2
        dense = stem + sum(p * i * o for p, i, o in zip(per_pixel, cin_dense, widths, strict=True))
        dense += widths[-1] * cfg.num_classes
        cout = kept * cfg.block if masks else torch.tensor(widths, device=device).expand(batch, -1)
        cin = torch.cat([cout.new_full((batch, 1), cin_dense[0]), cout[:, :-1]], 1)
        executed = (cin * cout * torch.tensor(per_pixel, device=device)).sum(1)
        executed += stem + cout[:, -1] * cfg.num_classes
        gates = torch.zeros_like(executed)
        if self.gates is not None:
            offsets = [g.macs(0, h, w) for g, (h, w) in zip(self.gates, sizes, strict=True)]
            slopes = [g.macs(1, h, w) - o for g, (h, w), o in zip(self.gates, sizes, offsets, strict=True)]
            gates = sum(offsets) + (cin * torch.tensor(slopes, device=device)).sum(1)
            executed += gates
        return Cost(dense, executed, gates, kept, self.gated_totals())


SMOKE = {"widths": (16, 32, 32)}  # a small instance, for the contract tests


@register_model(FastNet, smoke=SMOKE)
def acs_fastnet(num_classes: int = 10, gate: str | None = "cheap", **kwargs) -> FastNet:
    """ACS FastNet (64/256/256, cheap gates on blocks of 16 channels)."""
    return FastNet(FastNetConfig(num_classes=num_classes, gate=gate, **kwargs))


@register_model(FastNet, smoke=SMOKE)
def fastnet(num_classes: int = 10, **kwargs) -> FastNet:
    """The dense baseline: the same backbone and code with the gates off."""
    return FastNet(FastNetConfig(num_classes=num_classes, gate=None, **kwargs))
