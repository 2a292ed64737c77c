"""Compact execution of a G-ResNeXt.

Per block, only the kept width channels run: the rows of the first 1x1, the kept part of
each DGConv group of the 3x3, and the columns of the last 1x1 (BN folded into all three).
The 3x3 runs as one grouped convolution whose groups are padded to the fullest group's kept
count (cmax); those padding MACs are counted as executed. A block keeping no channel is its
shortcut plus a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.compact import CompactExecutor, State, Step, head_step, stem_step
from ..core.folding import fold_conv_bn
from ..core.gather import conv1x1_gathered, gather_rows
from .resnext import GBottleneck, GResNeXt


def group_slots(keep: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For keep (B, C) with equal counts: kept channels (B, k), their slots in the padded
    grouped layout (B, k), and the padded group size cmax."""
    b, c = keep.shape
    per_group = keep.reshape(b, groups, c // groups)
    cmax = int(per_group.sum(-1).amax())
    rank = per_group.cumsum(-1) - 1  # position of each kept channel within its group
    slot = rank + torch.arange(groups, device=keep.device)[:, None] * cmax
    rows = keep.nonzero()[:, 1].reshape(b, -1)
    return rows, slot.reshape(b, c).gather(1, rows), cmax


class CompactResNeXt(CompactExecutor):
    def __init__(self, model: GResNeXt) -> None:
        model = model.eval()
        steps = [stem_step(model.stem)]
        gated = 0
        for block in model.blocks:
            if block.gate is None:
                steps.append(Step(self._block_step(block)))
                continue
            steps.append(Step(self._block_step(block), gate=self._gate(block.gate),
                              gated_index=gated, groups=block.conv2.groups(),
                              key=self._key(block.conv2.groups())))
            gated += 1
        steps.append(head_step(model.fc))
        super().__init__(model, steps)

    @staticmethod
    def _gate(gate):
        def scores(state: State) -> torch.Tensor:
            return gate(state["h"])
        return scores

    @staticmethod
    def _key(groups: int):
        def key(keep: torch.Tensor) -> torch.Tensor:
            b, c = keep.shape
            cmax = keep.reshape(b, groups, c // groups).sum(-1).amax(-1)
            return keep.sum(1) * (c + 1) + cmax
        return key

    @staticmethod
    def _block_step(block: GBottleneck):
        w1, b1 = fold_conv_bn(block.conv1.weight[:, :, 0, 0], block.bn1)
        grouped, groups = block.conv2.grouped_weight()
        w2, b2 = fold_conv_bn(grouped, block.bn2)
        w3, b3 = fold_conv_bn(block.conv3.weight[:, :, 0, 0], block.bn3)
        width, size = w2.shape[0], w2.shape[1]
        # One zero column past the group's channels: what padded slots read.
        w2_ext = torch.cat([w2, w2.new_zeros(width, 1, 3, 3)], 1)
        stride = block.conv2.stride
        shortcut = None
        if block.shortcut is not None:
            ws, bs = fold_conv_bn(block.shortcut[0].weight, block.shortcut[1])
            shortcut = (ws, bs)

        def apply(state: State, keep) -> State:
            x = state["h"]
            identity = x if shortcut is None else F.conv2d(x, shortcut[0], shortcut[1], stride)
            if keep is None or keep.all():
                h = F.relu(F.conv2d(x, w1[:, :, None, None], b1))
                h = F.relu(F.conv2d(h, w2, b2, stride, 1, groups=groups))
                return {"h": F.relu(F.conv2d(h, w3[:, :, None, None], b3) + identity)}
            if not keep[0].any():
                return {"h": F.relu(identity + b3[:, None, None])}
            rows, slot, cmax = group_slots(keep, groups)
            b, k = rows.shape
            h1 = F.relu(torch.baddbmm(gather_rows(b1, rows)[..., None], gather_rows(w1, rows),
                                      x.flatten(2)))
            h1 = h1.reshape(b, k, *x.shape[2:])
            # Padded grouped layout: group i's kept channels sit in slots [i*cmax, i*cmax+c_i).
            padded = h1.new_zeros(b, groups * cmax, *x.shape[2:])
            padded.scatter_(1, slot[..., None, None].expand_as(h1), h1)
            local = torch.full((b, groups * cmax), size, dtype=torch.long, device=x.device)
            local.scatter_(1, slot, rows % size)  # each slot's channel index within its group
            out_rows = torch.full_like(local, 0).scatter_(1, slot, rows)
            members = local.reshape(b, groups, 1, cmax).expand(b, groups, cmax, cmax)
            weight = w2_ext[out_rows.reshape(b, groups, cmax)[..., None], members]
            weight = weight.reshape(b * groups * cmax, cmax, 3, 3)
            h2 = F.conv2d(padded.reshape(1, -1, *x.shape[2:]), weight, stride=stride, padding=1,
                          groups=b * groups)
            h2 = h2.reshape(b, groups * cmax, *h2.shape[2:])
            h2 = F.relu(h2.gather(1, slot[..., None, None].expand(b, k, *h2.shape[2:]))
                        + gather_rows(b2, rows)[..., None, None])
            out = conv1x1_gathered(h2, w3, rows, b3)
            return {"h": F.relu(out + identity)}
        return apply
