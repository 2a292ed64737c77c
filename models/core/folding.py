"""BatchNorm folding for compact execution: an eval-mode BN after a convolution becomes a
per-channel scale of its weight and a bias."""

from __future__ import annotations

import torch


def bn_stats(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """(4, C): running mean, running var, weight, bias of a BatchNorm."""
    return torch.stack([bn.running_mean, bn.running_var, bn.weight, bn.bias]).detach()


def bn_affine(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm."""
    mean, var, weight, bias = bn_stats(bn)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight (O, ...) with output row o multiplied by scale[o]."""
    return weight.detach() * scale.reshape(-1, *[1] * (weight.dim() - 1))


def fold_conv_bn(weight: torch.Tensor, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a bias-free convolution followed by an eval-mode BN."""
    scale, shift = bn_affine(bn)
    return scale_rows(weight, scale), shift
