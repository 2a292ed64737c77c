"""Compact execution of an ACS DenseNet.

Each dense block writes into one preallocated concatenation buffer that holds only the
channels computed so far (`present`, ascending global indices), beside a buffer of their
spatial means (what a cheap gate reads, so it never re-pools the whole concatenation). A
consumer's BN+ReLU maps a skipped (zero) channel to the constant relu(shift); its 1x1
convolution (or the classifier) reads only the present channels and folds the skipped ones'
constants into its bias. BN after a convolution is folded into its weights once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..acs.gates import ACSGate, CheapGate
from ..core.compact import CompactExecutor, State, Step
from ..core.folding import bn_affine, bn_stats
from ..core.gather import conv1x1_gathered, conv_rows_gathered, gather_rows, linear_gathered
from .densenet import ACSDenseNet


class _Consumer:
    """BN -> ReLU -> [pool] -> linear map over a block's present channels; the skipped
    channels' constants are folded into the bias."""

    def __init__(self, bn, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pool=None) -> None:
        self.stats, self.eps = bn_stats(bn), bn.eps
        self.const = F.relu(bn_affine(bn)[1])
        self.weight = weight.detach()
        self.weight_t = self.weight.T.contiguous()  # (C, O): present channels gather as rows
        self.bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
        self.full_bias = self.bias + self.weight @ self.const  # every channel skipped
        self.channels = weight.shape[1]
        self.pool = pool or (lambda y: y)

    def __call__(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, n = present.shape
        if n == self.channels:  # every channel present, in order
            y = self.pool(F.batch_norm(x, *self.stats, False, 0.0, self.eps).relu_())
            return _linear(y, self.weight, self.bias)
        if b == 1:
            p = present[0]
            y = F.batch_norm(x, *self.stats.index_select(1, p), False, 0.0, self.eps).relu_()
            weight_t = self.weight_t.index_select(0, p)
            bias = self.full_bias - self.const.index_select(0, p) @ weight_t
            return _linear(self.pool(y), weight_t.T, bias)
        mean, var, weight, bias = gather_rows(self.stats.T, present).permute(2, 0, 1)
        scale = weight / torch.sqrt(var + self.eps)
        shift = bias - mean * scale
        y = self.pool(torch.mul(x, scale[..., None, None]).add_(shift[..., None, None]).relu_())
        skipped = self.const.expand(b, -1).scatter(1, present, 0.0)
        bias = self.bias + skipped @ self.weight.T
        if y.dim() == 2:
            return linear_gathered(y, self.weight, present, bias)
        return conv1x1_gathered(y, self.weight, present, bias)


def _linear(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """weight (O, n) applied to y (B, n) or, as a 1x1 convolution, to y (B, n, H, W)."""
    if y.dim() == 2:
        return torch.addmm(bias, y, weight.T)
    b, n, h, w = y.shape
    if b == 1:
        return torch.addmm(bias[:, None], weight, y.reshape(n, h * w)).reshape(1, -1, h, w)
    return F.conv2d(y, weight[:, :, None, None], bias)


def _pool2(y: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; several times faster on channels-last tensors on the CPU."""
    return F.avg_pool2d(y.contiguous(memory_format=torch.channels_last), 2).contiguous()


def _global_pool(y: torch.Tensor) -> torch.Tensor:
    return y.mean((2, 3))


class _GateScores:
    """A gate's scores read off the block state: only present channels, pooled means cached."""

    def __init__(self, gate) -> None:
        self.gate = gate
        if isinstance(gate, CheapGate):
            self.weight, self.bias = gate.fc.weight.detach(), gate.fc.bias.detach()

    def __call__(self, state: State) -> torch.Tensor:
        present = state["present"]
        n = present.shape[1]
        if isinstance(self.gate, CheapGate):
            means = state["means"][:, :n]
            if present.shape[0] == 1:
                weight = self.weight if n == self.weight.shape[1] else \
                    self.weight.index_select(1, present[0])
                return torch.sigmoid(torch.addmm(self.bias, means, weight.T))
            return torch.sigmoid(linear_gathered(means, self.weight, present, self.bias))
        assert isinstance(self.gate, ACSGate)
        index = None if n == self.gate.reduce.in_channels else present
        return self.gate(state["buf"][:, :n], index=index)


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
                steps.append(Step(self._layer_step(layer, base), gate=_GateScores(layer.gate),
                                  gated_index=gated, key=lambda keep: keep.sum(1), zero=self._zero))
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
            means = h.new_empty(b, total)
            means[:, :c] = h.mean((2, 3))
            present = torch.arange(c, device=h.device)[None]  # shared by the batch
            return {"buf": buf, "means": means, "present": present}
        return apply

    @staticmethod
    def _layer_step(layer, base: int):
        scale2, shift2 = bn_affine(layer.norm2)
        consumer = _Consumer(layer.norm1, layer.conv1.weight[:, :, 0, 0] * scale2[:, None], shift2)
        weight2 = layer.conv2.weight.detach()
        growth = weight2.shape[0]
        all_rows = torch.arange(growth)

        def apply(state: State, keep) -> State:
            """keep: None (all), (B, growth) with equal counts, or (1, growth) shared by the
            batch (a union pass); `present` is likewise (B, n) or (1, n) shared."""
            buf, means, present = state["buf"], state["means"], state["present"]
            n = present.shape[1]
            if keep is None or keep.all():
                rows = all_rows.to(buf.device)[None]
            else:
                rows = keep.nonzero()[:, 1].reshape(keep.shape[0], -1)
                if rows.shape[1] == 0:
                    return state
            k = rows.shape[1]
            h = consumer(buf[:, :n], present).relu_()
            out = conv_rows_gathered(h, weight2, None if k == growth else rows, padding=1)
            buf[:, n : n + k] = out
            means[:, n : n + k] = out.mean((2, 3))
            if rows.shape[0] != present.shape[0]:  # one is shared, the other per sample
                rows, present = rows.expand(buf.shape[0], -1), present.expand(buf.shape[0], -1)
            return {"buf": buf, "means": means, "present": torch.cat([present, base + rows], 1)}
        return apply

    @staticmethod
    def _zero(state: State, own: torch.Tensor) -> State:
        """Zero each sample's new channels outside its own keep `own` (B, kept of the union):
        a zero channel is what a skipped one is to every consumer (BN+ReLU -> a constant)."""
        n, k = state["present"].shape[1], own.shape[1]
        mask = own.to(state["buf"].dtype)
        state["buf"][:, n - k : n] *= mask[:, :, None, None]
        state["means"][:, n - k : n] *= mask
        return state

    @staticmethod
    def _transition_step(transition):
        consumer = _Consumer(transition.norm, transition.conv.weight[:, :, 0, 0], pool=_pool2)

        def apply(state: State, keep) -> State:
            present = state["present"]
            return {"h": consumer(state["buf"][:, : present.shape[1]], present)}
        return apply

    @staticmethod
    def _head_step(model: ACSDenseNet):
        consumer = _Consumer(model.norm, model.classifier.weight, model.classifier.bias,
                             pool=_global_pool)

        def apply(state: State, keep) -> State:
            present = state["present"]
            return {"logits": consumer(state["buf"][:, : present.shape[1]], present)}
        return apply
