"""Layers that read only some input channels, chosen per sample (compact execution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_columns(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """weight (O, C) and index (B, n) -> per-sample weights (B, O, n), as a transposed view.

    A row gather of the transposed weight: many times faster than advanced indexing.
    """
    b, n = index.shape
    rows = weight.T.contiguous().index_select(0, index.reshape(-1))
    return rows.view(b, n, -1).transpose(1, 2)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (C, ...) and index (B, k) -> (B, k, ...)."""
    return tensor.index_select(0, index.reshape(-1)).view(*index.shape, *tensor.shape[1:])


def conv1x1_gathered(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution of x (B, n, H, W) holding input channels `index` (B, n) of `weight` (O, C).

    `bias` is (O,) or per sample (B, O). `index` None reads every channel in order. One
    sample runs as a plain convolution, a batch as bmm.
    """
    b, n, h, w = x.shape
    if index is None:
        return F.conv2d(x, weight[:, :, None, None]) + _bias(bias, weight, 4)
    if b == 1:
        out = torch.mm(weight.index_select(1, index[0]), x.reshape(n, h * w))
        return out.reshape(1, -1, h, w) + _bias(bias, weight, 4)
    out = torch.bmm(gather_columns(weight, index), x.reshape(b, n, h * w))
    return out.reshape(b, -1, h, w) + _bias(bias, weight, 4)


def linear_gathered(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer on x (B, n) holding input features `index` (B, n) of `weight` (O, C)."""
    if index is None:
        return F.linear(x, weight) + _bias(bias, weight, 2)
    if x.shape[0] == 1:
        return F.linear(x, weight.index_select(1, index[0])) + _bias(bias, weight, 2)
    out = torch.bmm(gather_columns(weight, index), x.unsqueeze(2)).squeeze(2)
    return out + _bias(bias, weight, 2)


def _bias(bias: torch.Tensor | None, weight: torch.Tensor, dims: int) -> torch.Tensor | float:
    """A bias of (O,) or (B, O) shaped to broadcast over a (B, O, ...) output of `dims` dims."""
    if bias is None:
        return 0.0
    return bias.reshape(-1, weight.shape[0], *([1] * (dims - 2)))


def conv_rows_gathered(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                       padding: int) -> torch.Tensor:
    """Convolution computing only output channels `rows` (B, k) (None: all) of `weight`.

    A batch runs as one grouped convolution with a weight gathered per sample.
    """
    b, c, h, w = x.shape
    if rows is None:
        return F.conv2d(x, weight, padding=padding)
    k = rows.shape[1]
    if b == 1:
        return F.conv2d(x, weight.index_select(0, rows[0]), padding=padding)
    gathered = weight.index_select(0, rows.reshape(-1))
    out = F.conv2d(x.reshape(1, b * c, h, w), gathered, padding=padding, groups=b)
    return out.reshape(b, k, out.shape[-2], out.shape[-1])
