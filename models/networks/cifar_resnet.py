"""The CIFAR ResNet layout that the slimmable, channel-gating and DFS networks share: a 3x3
stem, stages of basic blocks, a 1x1 projection shortcut where the shape changes."""

from __future__ import annotations


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
