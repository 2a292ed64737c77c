"""ACS-DG: a convolution whose channel grouping is learned (DGConv2d).

K = log2(C) scalar gates are binarized with a straight-through estimator. Gate g expands
to the 2x2 block (1-g)*I2 + g*ones(2,2); the Kronecker product of the K blocks is the CxC
channel-connectivity mask U applied to the weight. With the gates sorted (the default),
U = I_{C/s} (x) ones(s, s) is block-diagonal, so in eval mode the folded weight runs as a
grouped convolution with C/s groups and the grouping really removes MACs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def binarize(gate_logits: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 gates in the forward pass, sigmoid gradients in the backward pass (STE)."""
    soft = torch.sigmoid(gate_logits)
    hard = (gate_logits >= 0).to(soft.dtype)
    return hard + soft - soft.detach()


def kron_mask(gates: torch.Tensor) -> torch.Tensor:
    """Kronecker product of the blocks (1-g)*I2 + g*ones(2,2), one per gate, in order."""
    eye = torch.eye(2, dtype=gates.dtype, device=gates.device)
    ones = torch.ones(2, 2, dtype=gates.dtype, device=gates.device)
    mask = torch.ones(1, 1, dtype=gates.dtype, device=gates.device)
    for g in gates:
        mask = torch.kron(mask, (1 - g) * eye + g * ones)
    return mask


class DGConv2d(nn.Module):
    """Square convolution (C -> C) with a learned Kronecker-structured channel grouping."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = False,
        sort: bool = True,
    ) -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(
                f"DGConv2d needs in_channels == out_channels, got {in_channels} != {out_channels}"
            )
        channels = in_channels
        if channels < 2 or channels & (channels - 1):
            raise ValueError(f"DGConv2d needs a power-of-two channel count >= 2, got {channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.sort = sort
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        # Positive logits: every gate starts at 1, so U starts full (a dense convolution).
        self.gate = nn.Parameter(torch.full((int(math.log2(channels)),), 1.0))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self._folded: tuple[torch.Tensor, int] | None = None

    def gates(self) -> torch.Tensor:
        """Binary gates (with STE gradients), sorted ascending when `sort` is set."""
        g = binarize(self.gate)
        if self.sort:
            g = g[torch.argsort(self.gate.detach() >= 0, stable=True)]
        return g

    def mask(self) -> torch.Tensor:
        """The CxC channel-connectivity mask U."""
        return kron_mask(self.gates())

    def regularizer(self) -> torch.Tensor:
        """Number of non-zeros of U, 2^(K + sum g), differentiable through the STE."""
        return torch.prod(2 + 2 * self.gates())

    def penalty(self) -> torch.Tensor:
        """The network regularizer's term: the non-zeros of U over C^2."""
        return self.regularizer() / self.channels**2

    def groups(self) -> int:
        """Channel groups the eval convolution runs with: C / 2^(sum g) when sorted, else 1."""
        if not self.sort:
            return 1
        return self.channels >> int((self.gate.detach() >= 0).sum())

    def grouped_weight(self) -> tuple[torch.Tensor, int]:
        """(weight, groups) such that conv2d(x, weight, groups=groups) == the masked conv.

        Cached in eval mode; recomputed (and the cache dropped) in train mode.
        """
        if self.training or self._folded is None or self._folded[0].device != self.weight.device:
            with torch.no_grad():
                masked = self.weight * self.mask()[:, :, None, None]
                groups = self.groups()
                size = self.channels // groups
                blocks = [
                    masked[i * size : (i + 1) * size, i * size : (i + 1) * size]
                    for i in range(groups)
                ]
                folded = (torch.cat(blocks, 0).contiguous(), groups)
            if self.training:
                return folded
            self._folded = folded
        return self._folded

    def train(self, mode: bool = True) -> DGConv2d:
        self._folded = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            weight = self.weight * self.mask()[:, :, None, None]
            return F.conv2d(x, weight, self.bias, self.stride, self.padding)
        weight, groups = self.grouped_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, groups=groups)

    def macs_per_pixel(self) -> int:
        """MACs per output pixel of the grouped (eval) convolution."""
        return self.channels * (self.channels // self.groups()) * self.kernel_size**2

    def extra_repr(self) -> str:
        return f"{self.channels}, {self.channels}, kernel_size={self.kernel_size}, stride={self.stride}"
