"""MAC accounting: what a request costs, per sample and per gated layer.

Counted: multiply-accumulates of convolutions and fully connected layers, as the compact
executor runs them (gates included, BN folded). Element-wise work (BN, ReLU, pooling) is
not counted, as in fvcore, thop and ptflops.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Cost:
    """Executed MACs of a batch against the dense network's MACs."""

    dense: int
    executed: torch.Tensor  # (B,) MACs executed per sample, gates included
    gates: torch.Tensor  # (B,) of which spent in the gates
    kept: torch.Tensor  # (B, L) channels kept per gated layer
    totals: list[int]  # (L,) channels per gated layer

    def rows(self, index) -> Cost:
        """The cost of some samples of the batch (a slice or an index tensor), on the CPU.

        Per-sample tensor fields (subclasses' too) are indexed; the rest is kept."""
        batch = self.executed.shape[0]

        def take(value):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                return value[index].cpu()
            return value

        return type(self)(**{f.name: take(getattr(self, f.name)) for f in fields(self)})

    @property
    def ratio(self) -> torch.Tensor:
        """Executed MACs over dense MACs, per sample."""
        return self.executed.double() / self.dense

    @property
    def skipped_ratio(self) -> torch.Tensor:
        """Fraction of gated channels skipped, per sample (0 for an ungated network)."""
        if not self.totals:
            return torch.zeros(self.executed.shape[0], dtype=torch.float64)
        return 1 - self.kept.sum(1).double() / sum(self.totals)

    @property
    def layer_skipped_ratio(self) -> torch.Tensor:
        """(B, L) fraction of each gated layer's channels skipped."""
        totals = torch.tensor(self.totals, dtype=torch.float64, device=self.kept.device)
        return 1 - self.kept.double() / totals


def kept_counts(masks: list[torch.Tensor], batch: int, device=None) -> torch.Tensor:
    """(B, L) number of kept channels in each gated layer's mask."""
    if not masks:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    if all(m.shape == masks[0].shape for m in masks):
        return torch.stack(masks, 1).count_nonzero(2)
    return torch.stack([m.count_nonzero(1) for m in masks], 1)


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1, or a 1x1 with padding 0."""
    return (size - 1) // stride + 1
