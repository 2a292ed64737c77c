"""Compact execution of a slimmable ResNet: every convolution runs on contiguous weight slices.

At width counts (n_in, n_out) a convolution uses weight[:n_out, :n_in] with the BN of its
width level folded in (folded slices are built once per (layer, n_in, n_out) and cached), so
the channels a width drops are never computed. Samples with different widths run as
separate sub-batches (the executor's key is the layer's channel count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.compact import CompactExecutor, State, Step
from ..core.folding import scale_rows
from .slimmable import SlimBlock, SlimmableResNet


def _count(keep: torch.Tensor) -> torch.Tensor:
    return keep.sum(1)


class CompactSlimmableResNet(CompactExecutor):
    def __init__(self, model: SlimmableResNet) -> None:
        model = model.eval()
        self._folded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        steps = [Step(self._stem_step(model), gate=self._priority(model, 0), gated_index=0,
                      key=_count)]
        for block in model.blocks:
            if block.out_stream != block.in_stream:
                steps.append(Step(self._stream_step(), gate=self._priority(model, block.out_stream),
                                  gated_index=block.out_stream, key=_count))
            steps.append(Step(self._block_step(block), gate=self._priority(model, block.inner),
                              gated_index=block.inner, key=_count))
        steps.append(Step(self._head_step(model)))
        super().__init__(model, steps)

    def fold(self, conv, bn, cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
        """weight[:cout, :cin] with the BN of the width level of cout folded in, and its bias."""
        key = (id(conv), cin, cout)
        if key not in self._folded:
            with torch.no_grad():
                level = int(bn.level_of(torch.tensor([cout]))[0])
                scale, shift = bn.affine(level, cout)
                weight = scale_rows(conv.weight[:cout, :cin], scale)
                self._folded[key] = (weight.contiguous(), shift.contiguous())
        return self._folded[key]

    @staticmethod
    def _priority(model: SlimmableResNet, layer: int):
        def scores(state: State) -> torch.Tensor:
            x = state["h"] if "h" in state else state["x"]
            return model.priority(layer, x.shape[0], x.device)
        return scores

    def _stem_step(self, model: SlimmableResNet):
        def apply(state: State, keep) -> State:
            c = int(keep[0].sum())
            weight, bias = self.fold(model.stem, model.stem_bn, 3, c)
            h = F.relu(F.conv2d(state["x"], weight, bias, padding=1))
            return {"h": h, "c": c, "out": c}
        return apply

    @staticmethod
    def _stream_step():
        def apply(state: State, keep) -> State:
            return {**state, "out": int(keep[0].sum())}
        return apply

    def _block_step(self, block: SlimBlock):
        def apply(state: State, keep) -> State:
            h, cin, cout = state["h"], state["c"], state["out"]
            k = int(keep[0].sum())
            w1, b1 = self.fold(block.conv1, block.bn1, cin, k)
            w2, b2 = self.fold(block.conv2, block.bn2, k, cout)
            inner = F.relu(F.conv2d(h, w1, b1, block.stride, 1))
            out = F.conv2d(inner, w2, b2, 1, 1)
            if block.short_conv is None:
                short = h
            else:
                ws, bs = self.fold(block.short_conv, block.short_bn, cin, cout)
                short = F.conv2d(h, ws, bs, block.stride)
            return {"h": F.relu(out + short), "c": cout, "out": cout}
        return apply

    @staticmethod
    def _head_step(model: SlimmableResNet):
        fc = model.fc

        def apply(state: State, keep) -> State:
            c = state["c"]
            return {"logits": F.linear(state["h"].mean((2, 3)), fc.weight[:, :c], fc.bias)}
        return apply
