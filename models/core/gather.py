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
    return rows.view(b, n, weight.shape[0]).transpose(1, 2)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (C, ...) and index (B, k) -> (B, k, ...)."""
    return tensor.index_select(0, index.reshape(-1)).view(*index.shape, *tensor.shape[1:])


def conv1x1_gathered(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution of x (B, n, H, W) holding input channels `index` (B, n) of `weight` (O, C).

    `bias` is (O,) or per sample (B, O). `index` None reads every channel in order; an index
    of one row is shared by the whole batch. One sample or a shared index runs as one matrix
    product with one gathered weight, a batch as bmm.
    """
    b, n, h, w = x.shape
    if index is None:
        return F.conv2d(x, weight[:, :, None, None]) + _bias(bias, weight, 4)
    if b == 1:
        out = torch.mm(weight.index_select(1, index[0]), x.reshape(n, h * w))
        return out.reshape(1, -1, h, w) + _bias(bias, weight, 4)
    if index.shape[0] == 1:
        out = torch.matmul(weight.index_select(1, index[0]), x.reshape(b, n, h * w))
        return out.reshape(b, -1, h, w) + _bias(bias, weight, 4)
    out = torch.bmm(gather_columns(weight, index), x.reshape(b, n, h * w))
    return out.reshape(b, -1, h, w) + _bias(bias, weight, 4)


def linear_gathered(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer on x (B, n) holding input features `index` (B, n) of `weight` (O, C); an
    index of one row is shared by the whole batch."""
    if index is None:
        return F.linear(x, weight) + _bias(bias, weight, 2)
    if index.shape[0] == 1:
        if bias is None or bias.dim() == 1 or x.shape[0] == 1:
            return F.linear(x, weight.index_select(1, index[0]), None if bias is None else bias.reshape(-1))
        return F.linear(x, weight.index_select(1, index[0])) + bias
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

    A batch runs as one grouped convolution with a weight gathered per sample; rows of one
    row are shared by the batch (one gathered weight, a plain convolution).
    """
    b, c, h, w = x.shape
    if rows is None:
        return F.conv2d(x, weight, padding=padding)
    k = rows.shape[1]
    if b == 1 or rows.shape[0] == 1:
        return F.conv2d(x, weight.index_select(0, rows[0]), padding=padding)
    gathered = weight.index_select(0, rows.reshape(-1))
    out = F.conv2d(x.reshape(1, b * c, h, w), gathered, padding=padding, groups=b)
    return out.reshape(b, k, out.shape[-2], out.shape[-1])


MKLDNN_DTYPES = (torch.float32, torch.bfloat16)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 1,
           groups: int = 1) -> torch.Tensor:
    """F.conv2d, but on the CPU always through oneDNN: for one small image PyTorch picks its
    native im2col path, up to 4x slower on these layer sizes (bench/skip_speed.py)."""
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.dtype in MKLDNN_DTYPES:
        return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, (padding, padding),
                                        (1, 1), (1, 1), groups)
    return F.conv2d(x, weight, bias, padding=padding, groups=groups)


def block_channels(blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, k * block) channel indices of the channel blocks (B, k), from `table` (blocks,
    block): row i holds block i's channel indices (one gather instead of arithmetic)."""
    return table.index_select(0, blocks.reshape(-1)).view(blocks.shape[0], -1)


def conv3x3_gathered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, block: int,
                     rows: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor:
    """3x3 convolution (padding 1) computing output channels `rows` (B, k), whole blocks of
    `block` channels, from x (B, n * block, H, W) holding the input channel blocks `columns`
    (B, n) of `weight` (O, C, 3, 3); None means all, in order.

    The weight is gathered in one copy of runs of block * 9 values (a row's kept input
    block) into the layout the convolution reads. One sample runs as a plain convolution on
    its gathered weight, a batch as one grouped convolution with a weight gathered per
    sample. Rows and columns of one row each are shared by the whole batch: one gathered
    weight, a plain convolution. No input channel leaves only the bias.
    """
    b, c, h, w = x.shape
    if rows is None and columns is None:
        return conv2d(x, weight, bias)
    per = max(1 if rows is None else rows.shape[0], 1 if columns is None else columns.shape[0])
    rows = (torch.arange(weight.shape[0], device=x.device) if rows is None else rows).expand(per, -1)
    k = rows.shape[1]
    bias = bias.index_select(0, rows.reshape(-1)).view(per, k)
    if k == 0 or c == 0:
        return bias[:, :, None, None].expand(b, k, h, w).contiguous()
    if columns is None:
        weight = weight.index_select(0, rows.reshape(-1))
    else:
        chunks = rows[..., None] * (weight.shape[1] // block) + columns[:, None, :]
        weight = weight.view(-1, block * 9).index_select(0, chunks.view(-1))
    weight = weight.view(per * k, c, 3, 3)
    if per == 1:
        return conv2d(x, weight, bias[0])
    return conv2d(x.reshape(1, b * c, h, w), weight, bias.reshape(-1), groups=b).view(b, k, h, w)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, stride 2 (the odd last row and column dropped), as two element-wise
    maxima: several times faster than F.max_pool2d for one small image on the CPU."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :h, :w]
    x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(x[..., 0::2], x[..., 1::2])
