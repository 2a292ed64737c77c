"""A network described once, as a list of units, and walked three ways.

A network is its units in execution order (`GatedNetwork.units()`): a stem, the layers or
blocks, a head. A unit describes itself once:

- `gated_layers()`: (channels, groups) of each gated layer it decides, in order; the
  network's gated layers, their order and their sizes are these, concatenated;
- `reference(state, trace)`: its masked reference forward; a gated unit scores its
  channels and takes its masks from `trace`, which numbers the gated layers in order;
- `cost(tally)`: the MACs it executes for the masks that `tally` hands out in order;
- `steps()`: its compact steps (`Step`s; one with a gate per gated layer): skipped channels
  never computed.

`GatedNetwork.run` and `macs` and the compact executor are these three walks, written once
here and in `engines/compact.py`. The states are dicts of batch-first tensors; a unit reads
what the unit before it wrote ("x" the input, "h" the features, "logits" at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .macs import Cost, kept_counts


def kept_count(keep: torch.Tensor) -> torch.Tensor:
    """(B,) channels kept per sample: the default key (equal counts run together)."""
    return keep.sum(1)


@dataclass
class Kernels:
    """A step as plain modules, which a compiling runtime runs instead of its `apply`:
    `modules[k]` maps state[reads] to state[writes] for the samples whose gated step keeps k
    channels (a level), None leaves the state as it is; an ungated step has one module. A
    module that serves several levels is compiled once."""

    modules: list[nn.Module | None]
    reads: str = "h"
    writes: str = "h"


@dataclass
class Step:
    """One stage of compact execution. Gated steps also score, select and key their masks
    (the executor numbers gated steps in order: `gated_index`)."""

    apply: callable  # (state, keep or None) -> state
    gate: callable | None = None  # state -> scores (B, C)
    groups: int = 1
    key: callable = kept_count  # keep (B, C) -> (B,) shape key; equal keys batch together
    zero: callable | None = None  # (state after a shared keep (1, C), own (B, kept)) -> state
    kernels: Kernels | None = None  # the step as modules, for a compiling runtime
    merges: bool = False  # its output has one shape whatever it keeps: the groups a batch
    # splits into at this step run on together after it
    gated_index: int = -1


class Unit:
    """One stage of a network: what it computes, what it costs, how it runs compact."""

    def gated_layers(self) -> list[tuple[int, int]]:
        """(channels, groups) of each gated layer this unit decides, in execution order."""
        return []

    def reference(self, state: dict, trace: Trace) -> dict:
        """The masked reference forward: the state after this unit."""
        raise NotImplementedError

    def cost(self, tally: Tally) -> None:
        """Add this unit's dense and executed MACs to `tally`."""
        raise NotImplementedError

    def steps(self) -> list:
        """This unit's compact steps (the model is in eval mode)."""
        raise NotImplementedError


class Trace:
    """What the reference walk decided: per gated layer in order, its mask (straight-through
    in training) and scores; and a method's per-call data (`extra`, handed to the cost walk
    as `macs` keyword arguments: channel gating's open pixels)."""

    def __init__(self, plan, straight_through) -> None:
        self.plan = plan
        self.straight_through = straight_through
        self.masks: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.extra: dict[str, list] = {}

    def keep(self, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The plan's hard keep-mask (B, C) for the next gated layer from its scores."""
        return self.plan.select(len(self.masks), scores, groups)

    def record(self, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Record the next gated layer's decision; its mask, straight-through in training."""
        mask = self.straight_through(hard, scores)
        self.masks.append(mask)
        self.scores.append(scores)
        return mask

    def mask(self, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """`record(keep(scores))`: the next gated layer's mask as the plan selects it."""
        return self.record(self.keep(scores, groups), scores)

    def add(self, name: str, value) -> None:
        """Append a per-gated-layer figure of this call to `extra[name]`."""
        self.extra.setdefault(name, []).append(value)


class Tally:
    """The cost walk's running sums, per sample: dense MACs (one int), executed MACs and the
    gates' share (B,). Units take their gated layers' masks in order (`next`), and pass on
    what the next unit needs in `flow` ("height" and "width"; "channels": the channels the
    next unit reads, one int or per sample)."""

    def __init__(self, masks: list[torch.Tensor], height: int, width: int, batch: int,
                 extra: dict) -> None:
        self.masks = masks
        self.batch = masks[0].shape[0] if masks else batch
        self.device = masks[0].device if masks else None
        self.kept = kept_counts(masks, self.batch, self.device)
        self.extra = extra
        self.flow: dict = {"height": height, "width": width}
        self.dense = 0
        self.executed = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.gates = torch.zeros_like(self.executed)
        self.index = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.flow["height"], self.flow["width"]

    @size.setter
    def size(self, value: tuple[int, int]) -> None:
        self.flow["height"], self.flow["width"] = value

    def next(self) -> int:
        """The index of the next gated layer (its mask is masks[i], its counts kept[:, i])."""
        self.index += 1
        return self.index - 1

    def add(self, dense: int, executed: torch.Tensor | int | None = None, gate=0) -> None:
        """Add a part's dense MACs, its executed MACs per sample (default: all of them) and
        its gate's MACs (executed, not dense)."""
        self.dense += dense
        self.executed += (dense if executed is None else executed) + gate
        self.gates += gate

    def cost(self, totals: list[int]) -> Cost:
        return Cost(self.dense, self.executed, self.gates, self.kept, totals)


class ConvStem(Unit):
    """An ungated stem: h = forward(x), whose MACs are those of its convolution `conv`
    (groups 1), followed by a pooling of stride `pool` (1: none). `compact`: the function
    the compact step runs instead of `forward` (the same result, a faster kernel). A
    `forward` that is a module is also the step's kernel."""

    def __init__(self, conv: nn.Conv2d, forward, pool: int = 1, compact=None) -> None:
        self.conv, self.forward, self.pool = conv, forward, pool
        self.compact = compact or forward

    def reference(self, state: dict, trace: Trace) -> dict:
        return {"h": self.forward(state["x"])}

    def cost(self, tally: Tally) -> None:
        conv = self.conv
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        h, w = tally.size
        h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        tally.add(h * w * conv.in_channels * conv.out_channels * kh * kw)
        tally.size = (h - 1) // self.pool + 1, (w - 1) // self.pool + 1
        tally.flow["channels"] = conv.out_channels

    def steps(self) -> list[Step]:
        def apply(state: dict, keep) -> dict:  # a method's per-call data passes on
            return {k: v for k, v in state.items() if k != "x"} | {"h": self.compact(state["x"])}
        kernels = Kernels([self.forward], reads="x") if isinstance(self.forward, nn.Module) else None
        return [Step(apply, kernels=kernels)]


def classifier_cost(tally: Tally, fc: nn.Linear) -> None:
    """A classifier's MACs: dense over all its inputs, executed over the channels that reach
    it (`flow["channels"]`, one count or one per sample)."""
    tally.add(fc.in_features * fc.out_features, tally.flow["channels"] * fc.out_features)


class LinearHead(Unit):
    """The ungated head: logits = fc(global average pool of h)."""

    def __init__(self, fc: nn.Linear) -> None:
        self.fc = fc
        self.module = PoolLinear(fc)

    def reference(self, state: dict, trace: Trace) -> dict:
        return {"logits": self.module(state["h"])}

    def cost(self, tally: Tally) -> None:
        tally.add(self.fc.in_features * self.fc.out_features)

    def steps(self) -> list[Step]:
        return [Step(lambda state, keep: self.reference(state, None),
                     kernels=Kernels([self.module], writes="logits"))]


class PoolLinear(nn.Module):
    """fc(global average pool of h): a linear head as a module."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean((2, 3)))
