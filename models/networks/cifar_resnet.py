"""Pieces shared by the other dynamic methods (slimmable width, channel gating, DFS).

- The CIFAR ResNet layout they all use (3x3 stem, stages of basic blocks, a 1x1 projection
  shortcut where the shape changes).
- Prefix ("thermometer") masks: slimmable widths keep the first n channels of a layer, DFS
  keeps the first n precision levels of a block (0: skip, 1: the lowest bit-width, ...).
- `PrefixPlan`: a budget plan whose keep-masks are prefixes. The policy decides how many
  entries a layer keeps (by threshold, top-k count or both); which ones is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.budget import BudgetPlan


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1, or a 1x1 with padding 0."""
    return (size - 1) // stride + 1


def resnet_layout(blocks: tuple[int, ...], widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of every basic block of a CIFAR ResNet whose stem
    outputs widths[0] channels; the first block of every stage after the first has stride 2."""
    if len(blocks) != len(widths) or not blocks:
        raise ValueError(f"blocks {blocks} and widths {widths} must have one entry per stage")
    layout, c = [], widths[0]
    for i, (depth, width) in enumerate(zip(blocks, widths, strict=True)):
        for j in range(depth):
            layout.append((c, width, 2 if i > 0 and j == 0 else 1))
            c = width
    return layout


def prefix_mask(counts: torch.Tensor, total: int) -> torch.Tensor:
    """(B, total) bool masks keeping the first counts[b] entries of each row."""
    return torch.arange(total, device=counts.device)[None] < counts[:, None]


@dataclass
class PrefixPlan(BudgetPlan):
    """A budget plan whose masks are prefixes: as many leading entries as the policy keeps.

    With scores that do not increase along a layer (DFS's thermometer scores) this is what
    the policy selects anyway; it also settles ties, so masks are always prefixes.
    """

    def select(self, layer: int, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        keep = super().select(layer, scores, groups)
        return prefix_mask(keep.sum(1), scores.shape[1])

    def rows(self, index: torch.Tensor) -> PrefixPlan:
        return type(self)(self.policy, self.requested[index], self.effective[index],
                          self.tau[index], self.counts[index])
