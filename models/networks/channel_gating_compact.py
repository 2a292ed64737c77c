"""Compact execution of a channel-gated ResNet: the rest of a convolution runs only for the
output channels that need it.

Per gated convolution, the gate step computes the partial sum over the base input channels
for every output channel and pixel (it is part of the output, never recomputed) and scores
each (channel, pixel). The apply step then computes the rest, over the remaining input
channels, only for the output channels open at any pixel of the sample (gathered weight
rows; samples with equal open counts run together, others as separate sub-batches), and
adds it where the pixel is open (threshold, cap) or everywhere in the channel (topk).
That per-channel realization is what `Cost.executed` counts; `pixel_executed` is the ideal
per-pixel figure, recorded here per sample.

The partial sums, gate scores and BN are computed with the same operations as the masked
reference, so both make the same per-pixel decisions on the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.compact import CompactExecutor, State, Step, head_step
from .channel_gating import CGBlock, CGResNet, ChannelGatedConv2d, pixel_mask


class _Record:
    """Per-call side channel: open (channel, pixel) pairs per sample and gated layer. Shared
    (not sliced) by the sub-batches of one call, indexed by each sample's original row."""

    def __init__(self, batch: int, layers: int, device) -> None:
        self.open = torch.zeros(batch, layers, dtype=torch.long, device=device)


def rest_rows(conv: ChannelGatedConv2d, x: torch.Tensor,
              keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rest of `conv` for each sample's kept output channels: (rows (B, k), rest (B, k, H, W));
    rows None when every channel is kept. Every sample keeps the same number k."""
    b = x.shape[0]
    weight = conv.rest_weight()
    xr = x[:, conv.base :]
    if keep.all():
        return None, F.conv2d(xr, weight, None, conv.stride, 1)
    rows = keep.nonzero()[:, 1].reshape(b, -1)
    k = rows.shape[1]
    if b == 1:
        return rows, F.conv2d(xr, weight.index_select(0, rows[0]), None, conv.stride, 1)
    gathered = weight.index_select(0, rows.reshape(-1))
    c, height, width = xr.shape[1:]
    out = F.conv2d(xr.reshape(1, b * c, height, width), gathered, None, conv.stride, 1, groups=b)
    return rows, out.reshape(b, k, *out.shape[-2:])


class CompactCGResNet(CompactExecutor):
    def __init__(self, model: CGResNet) -> None:
        model = model.eval()
        self.layers = len(model.gated_totals())
        steps = [Step(self._stem_step(model))]
        gated = 0
        for block in model.blocks:
            for which, conv in (("conv1", block.conv1), ("conv2", block.conv2)):
                source = "h" if which == "conv1" else "h1"
                apply = self._conv_step(block, which, gated if conv.gate is not None else -1)
                if conv.gate is None:
                    steps.append(Step(apply))
                    continue
                steps.append(Step(apply, gate=self._gate(conv, source), gated_index=gated,
                                  key=lambda keep: keep.sum(1)))
                gated += 1
        steps.append(head_step(model.fc))
        super().__init__(model, steps)

    def initial_state(self, x: torch.Tensor, plan) -> State:
        """The input, tau and the policy (for the per-pixel masks), every sample's row, and a
        record of open pixels (for the per-pixel MAC count)."""
        b = x.shape[0]
        return {"x": x, "tau": plan.tau, "policy": plan.policy, "index": torch.arange(b, device=x.device),
                "record": _Record(b, self.layers, x.device)}

    def cost_extra(self, state: State) -> dict:
        record = state["record"]
        return {"open_pixels": [record.open[:, i] for i in range(self.layers)]}

    @staticmethod
    def _stem_step(model: CGResNet):
        def apply(state: State, keep) -> State:
            h = F.relu(model.stem_bn(model.stem(state["x"])))
            return {k: v for k, v in state.items() if k != "x"} | {"h": h}
        return apply

    @staticmethod
    def _gate(conv: ChannelGatedConv2d, source: str):
        def scores(state: State) -> torch.Tensor:
            p = conv.partial(state[source])
            s = conv.scores(p)
            state["p"], state["s"] = p, s  # sliced with the state if the batch splits
            return s.amax((2, 3))
        return scores

    @staticmethod
    def _conv_step(block: CGBlock, which: str, layer: int):
        conv = getattr(block, which)

        def output(state: State, keep) -> torch.Tensor:
            x = state["h"] if which == "conv1" else state["h1"]
            if conv.gate is None:
                return conv.conv(x)
            p, s = state["p"], state["s"]
            pixels = pixel_mask(state["policy"], state["tau"], keep, s)
            state["record"].open[state["index"], layer] = pixels.sum((1, 2, 3))
            if not keep.any():
                return p
            rows, rest = rest_rows(conv, x, keep)
            if rows is None:
                return p + pixels.to(p.dtype) * rest
            index = rows[:, :, None, None].expand_as(rest)
            return p.scatter_add(1, index, rest * pixels.gather(1, index).to(rest.dtype))

        def apply(state: State, keep) -> State:
            y = output(state, keep)
            state = {k: v for k, v in state.items() if k not in ("p", "s")}
            if which == "conv1":
                return {**state, "h1": F.relu(block.bn1(y))}
            h = F.relu(block.bn2(y) + block.short(state["h"]))
            return {k: v for k, v in state.items() if k != "h1"} | {"h": h}
        return apply
