"""Compact execution of a FastNet: skipped channel blocks are never computed.

Every convolution has its BN folded in once (scale into the weight, shift into a bias; the
scale is positive, so BN commutes with the max pool). A gated layer gathers the weight rows of
its kept output blocks and the columns of the previous layer's kept blocks, so a block skipped
in one layer also drops out of the next layer's input. The gates read only the channels that
exist. Samples that keep the same number of blocks in a layer run as one grouped convolution;
under `threshold` a batch runs the union of its kept blocks as one plain convolution and
zeros the blocks a sample did not keep (`CompactExecutor`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.compact import CompactExecutor, State, Step
from ..core.folding import fold_conv_bn
from ..core.gather import block_channels, conv2d, conv3x3_gathered, linear_gathered, max_pool2x2
from .fastnet import FastNet, conv_weight


def _count(keep: torch.Tensor) -> torch.Tensor:
    return keep.sum(1)


def kept_blocks(keep: torch.Tensor) -> torch.Tensor | None:
    """(B, k) indices of the kept blocks (B, U) (equal counts), or None when all are kept."""
    kept = keep.nonzero()
    return None if kept.shape[0] == keep.numel() else kept[:, 1].view(keep.shape[0], -1)


class CompactFastNet(CompactExecutor):
    def __init__(self, model: FastNet) -> None:
        model = model.eval()
        self.block = model.config.block
        with torch.no_grad():
            self.folded = []
            for conv, norm in zip(model.convs, model.norms, strict=True):
                if (norm.weight <= 0).any():
                    raise ValueError("a FastNet BN scale must be positive to commute with max pooling")
                weight, shift = fold_conv_bn(conv_weight(conv), norm)
                self.folded.append((weight.contiguous(), shift.contiguous()))
        whiten = model.whiten.weight.detach(), model.whiten.bias.detach()
        steps = [Step(lambda state, keep: {"h": F.gelu(conv2d(state["x"], *whiten, padding=0)),
                                           "blocks": None, "index": None})]
        for i in range(len(model.convs)):
            gate = None if model.gates is None else self._gate(model.gates[i])
            steps.append(Step(self._layer(i), gate=gate, gated_index=i if gate else -1, key=_count,
                              zero=self._zero))
        steps.append(Step(self._head(model)))
        super().__init__(model, steps)

    @staticmethod
    def _gate(gate):
        def scores(state: State) -> torch.Tensor:
            return gate(state["h"], state["index"])
        return scores

    def _layer(self, i: int):
        weight, bias = self.folded[i]
        channels = torch.arange(weight.shape[0], device=weight.device).view(-1, self.block)

        def apply(state: State, keep) -> State:
            blocks = None if keep is None else kept_blocks(keep)
            rows = None if blocks is None else block_channels(blocks, channels)
            h = conv3x3_gathered(state["h"], weight, bias, self.block, rows, state["blocks"])
            if i % 2 == 0:
                h = max_pool2x2(h)
            return {"h": F.gelu(h), "blocks": blocks, "index": rows}
        return apply

    def _zero(self, state: State, own: torch.Tensor) -> State:
        """Zero each sample's blocks outside its own keep `own` (B, kept blocks of the pass)."""
        mask = own.repeat_interleave(self.block, 1).to(state["h"].dtype)
        return {**state, "h": state["h"] * mask[:, :, None, None]}

    @staticmethod
    def _head(model: FastNet):
        def apply(state: State, keep) -> State:
            h = state["h"]
            pooled = h.amax((2, 3)) if h.shape[1] else h.new_zeros(h.shape[0], 0)
            logits = linear_gathered(pooled, model.head.weight, state["index"])
            return {"logits": logits * model.config.head_scale}
        return apply
