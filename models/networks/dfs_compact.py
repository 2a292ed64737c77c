"""Compact execution of a DFS ResNet: a skipped block is not computed at all, and an executed
block runs only at its chosen bit-width.

Samples at the same level of a block run together (the executor's key is the level); a
skipped block passes its input on. The quantized weights of every (block, bit-width) are
built once. Quantized blocks run fake-quantized in floating point, so they take the time of
a full-precision block: only skipping saves time (BitOps are the paper's figure, not a
time). The operations are those of the masked reference, so both quantize the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.compact import CompactExecutor, State, Step, head_step, stem_step
from .dfs import DFSBlock, DFSResNet, quantize_weight


class CompactDFSResNet(CompactExecutor):
    def __init__(self, model: DFSResNet) -> None:
        model = model.eval()
        steps = [stem_step(lambda x: F.relu(model.stem_bn(model.stem(x))))]
        gated = 0
        for block in model.blocks:
            if block.gate is None:
                steps.append(Step(self._full_step(block)))
                continue
            steps.append(Step(self._gated_step(block, model.config.bits), gate=self._gate(block),
                              gated_index=gated, key=lambda keep: keep.sum(1)))
            gated += 1
        steps.append(head_step(model.fc))
        super().__init__(model, steps)

    @staticmethod
    def _full_step(block: DFSBlock):
        def apply(state: State, keep) -> State:
            return {"h": block.full(state["h"])}
        return apply

    @staticmethod
    def _gate(block: DFSBlock):
        def scores(state: State) -> torch.Tensor:
            return block.gate(state["h"])
        return scores

    @staticmethod
    def _gated_step(block: DFSBlock, bits: tuple[int, ...]):
        with torch.no_grad():
            weights = [(quantize_weight(block.conv1.weight, b), quantize_weight(block.conv2.weight, b))
                       for b in bits]

        def apply(state: State, keep) -> State:
            level = int(keep[0].sum())
            if level == 0:
                return state  # skipped: not computed
            h = state["h"]
            return {"h": F.relu(h + block.branch(h, bits[level - 1], weights[level - 1]))}
        return apply
