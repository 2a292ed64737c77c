"""Compact execution of an ACS DenseNet.

Each dense block writes into one preallocated concatenation buffer that holds only the
channels computed so far (`present`, ascending global indices). A consumer's BN+ReLU maps a
skipped (zero) channel to the constant relu(shift); its 1x1 convolution (or the classifier)
reads only the present channels and folds the skipped ones' constants into a bias. BN after
a convolution is folded into its weights once, at construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compact import CompactExecutor, State, Step
from .densenet import ACSDenseNet
from .gather import conv1x1_gathered, conv_rows_gathered, linear_gathered


def bn_affine(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm."""
    stats = [t.detach() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    return bn_affine_tensors(stats, bn.eps)


def bn_affine_tensors(stats: list[torch.Tensor], eps: float, index: torch.Tensor | None = None):
    """(scale, shift) from BN (mean, var, weight, bias), optionally gathered at `index`."""
    mean, var, weight, bias = stats if index is None else [t[index] for t in stats]
    scale = weight / torch.sqrt(var + eps)
    return scale, bias - mean * scale


class _Consumer:
    """BN -> ReLU -> linear map over a block's present channels, skipped ones folded to a bias."""

    def __init__(self, bn, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bn = [t.detach() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
        self.eps = bn.eps
        self.const = F.relu(bn_affine(bn)[1])
        self.weight = weight
        self.bias = torch.zeros(weight.shape[0]) if bias is None else bias
        self.channels = weight.shape[1]

    def normalize(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """BN + ReLU of the present channels x (B, n, H, W); one sample or a shared index."""
        stats = self.bn
        if x.shape[1] < self.channels:
            if present.shape[0] > 1 and (present != present[:1]).any():
                scale, shift = bn_affine_tensors(stats, self.eps, present)
                return torch.addcmul(shift[..., None, None], x, scale[..., None, None]).relu_()
            stats = [t.index_select(0, present[0]) for t in stats]
        return F.batch_norm(x, *stats, False, 0.0, self.eps).relu_()

    def folded_bias(self, present: torch.Tensor) -> torch.Tensor:
        """(B, O) bias: own bias plus what the skipped channels' constants contribute."""
        if present.shape[1] == self.channels:
            return self.bias.expand(present.shape[0], -1)
        skipped = self.const.expand(present.shape[0], -1).scatter(1, present, 0.0)
        return self.bias + skipped @ self.weight.T

    def index(self, present: torch.Tensor) -> torch.Tensor | None:
        return None if present.shape[1] == self.channels else present


class CompactDenseNet(CompactExecutor):
    def __init__(self, model: ACSDenseNet) -> None:
        model = model.eval()
        cfg = model.config
        steps = [Step(self._stem_step(model))]
        gated = 0
        for i, block in enumerate(model.blocks):
            total = model.block_inputs[i] + len(block) * cfg.growth
            steps.append(Step(self._block_start(total)))
            for j, layer in enumerate(block):
                base = model.block_inputs[i] + j * cfg.growth
                if layer.gate is None:
                    steps.append(Step(self._layer_step(layer, base)))
                    continue
                steps.append(Step(self._layer_step(layer, base), gate=self._gate(layer.gate),
                                  gated_index=gated, key=lambda keep: keep.sum(1)))
                gated += 1
            if i < len(model.transitions):
                steps.append(Step(self._transition_step(model.transitions[i])))
        steps.append(Step(self._head_step(model)))
        super().__init__(model, steps)

    @staticmethod
    def _stem_step(model: ACSDenseNet):
        weight = model.stem.weight.detach()

        def apply(state: State, keep) -> State:
            return {"h": F.conv2d(state["x"], weight, padding=1)}
        return apply

    @staticmethod
    def _block_start(total: int):
        def apply(state: State, keep) -> State:
            h = state["h"]
            b, c, height, width = h.shape
            buf = h.new_empty(b, total, height, width)
            buf[:, :c] = h
            present = torch.arange(c, device=h.device).expand(b, c)
            return {"buf": buf, "present": present}
        return apply

    @staticmethod
    def _gate(gate):
        def scores(state: State) -> torch.Tensor:
            present = state["present"]
            return gate(state["buf"][:, : present.shape[1]], index=present)
        return scores

    @staticmethod
    def _layer_step(layer, base: int):
        scale2, shift2 = bn_affine(layer.norm2)
        weight1 = layer.conv1.weight[:, :, 0, 0].detach() * scale2[:, None]
        consumer = _Consumer(layer.norm1, weight1, shift2)
        weight2 = layer.conv2.weight.detach()
        growth = weight2.shape[0]

        def apply(state: State, keep) -> State:
            buf, present = state["buf"], state["present"]
            b, n = present.shape
            if keep is None:
                rows = None
                k = growth
            else:
                k = int(keep[0].sum())
                if k == 0:
                    return state
                rows = None if k == growth else keep.nonzero()[:, 1].reshape(b, k)
            y = consumer.normalize(buf[:, :n], present)
            h = F.relu(conv1x1_gathered(y, consumer.weight, consumer.index(present),
                                        consumer.folded_bias(present)))
            buf[:, n : n + k] = conv_rows_gathered(h, weight2, rows, padding=1)
            new = torch.arange(growth, device=buf.device).expand(b, -1) if rows is None else rows
            return {"buf": buf, "present": torch.cat([present, base + new], 1)}
        return apply

    @staticmethod
    def _transition_step(transition):
        consumer = _Consumer(transition.norm, transition.conv.weight[:, :, 0, 0].detach())

        def apply(state: State, keep) -> State:
            buf, present = state["buf"], state["present"]
            y = consumer.normalize(buf[:, : present.shape[1]], present)
            # Average pooling is several times faster on channels-last tensors on the CPU.
            y = F.avg_pool2d(y.contiguous(memory_format=torch.channels_last), 2).contiguous()
            h = conv1x1_gathered(y, consumer.weight, consumer.index(present),
                                 consumer.folded_bias(present))
            return {"h": h}
        return apply

    @staticmethod
    def _head_step(model: ACSDenseNet):
        consumer = _Consumer(model.norm, model.classifier.weight.detach(),
                             model.classifier.bias.detach())

        def apply(state: State, keep) -> State:
            buf, present = state["buf"], state["present"]
            pooled = consumer.normalize(buf[:, : present.shape[1]], present).mean((2, 3))
            logits = linear_gathered(pooled, consumer.weight, consumer.index(present),
                                     consumer.folded_bias(present))
            return {"logits": logits}
        return apply
