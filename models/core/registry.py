"""Architectures by name: build from a config, describe a model, pick its compact executor."""

from __future__ import annotations

import dataclasses

from ..networks.channel_gating import CGResNet, CGResNetConfig, cg_resnet20, resnet20
from ..networks.channel_gating_compact import CompactCGResNet
from ..networks.densenet import ACSDenseNet, DenseNetConfig, acs_densenet40, densenet40
from ..networks.densenet_compact import CompactDenseNet
from ..networks.dfs import DFSResNet, DFSResNetConfig, dfs_resnet38, resnet38
from ..networks.dfs_compact import CompactDFSResNet
from ..networks.fastnet import FastNet, FastNetConfig, acs_fastnet, fastnet
from ..networks.fastnet_compact import CompactFastNet
from ..networks.resnext import GResNeXt, ResNeXtConfig, g_resnext29, g_resnext50, g_resnext101
from ..networks.resnext_compact import CompactResNeXt
from ..networks.slimmable import SlimmableResNet, SlimmableResNetConfig, slimmable_resnet20
from ..networks.slimmable_compact import CompactSlimmableResNet
from .base import GatedNetwork
from .compact import CompactExecutor

ARCHITECTURES = {
    "densenet": (ACSDenseNet, DenseNetConfig, CompactDenseNet),
    "resnext": (GResNeXt, ResNeXtConfig, CompactResNeXt),
    "slimmable_resnet": (SlimmableResNet, SlimmableResNetConfig, CompactSlimmableResNet),
    "cg_resnet": (CGResNet, CGResNetConfig, CompactCGResNet),
    "dfs_resnet": (DFSResNet, DFSResNetConfig, CompactDFSResNet),
    "fastnet": (FastNet, FastNetConfig, CompactFastNet),
}

FACTORIES = {
    "acs_fastnet": acs_fastnet,
    "fastnet": fastnet,
    "acs_densenet40": acs_densenet40,
    "densenet40": densenet40,
    "g_resnext29": g_resnext29,
    "g_resnext50": g_resnext50,
    "g_resnext101": g_resnext101,
    "slimmable_resnet20": slimmable_resnet20,
    "cg_resnet20": cg_resnet20,
    "resnet20": resnet20,
    "dfs_resnet38": dfs_resnet38,
    "resnet38": resnet38,
}


def make_config(architecture: str, config: dict):
    """The architecture's config dataclass from a plain dict (JSON lists become tuples)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; "
                         f"expected one of {sorted(ARCHITECTURES)}")
    config_cls = ARCHITECTURES[architecture][1]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {architecture} config keys: {unknown}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def build_model(architecture: str, config: dict) -> GatedNetwork:
    """A freshly initialized network of a named architecture ('densenet', 'resnext')."""
    config = make_config(architecture, config)
    return ARCHITECTURES[architecture][0](config)


def describe(model: GatedNetwork) -> tuple[str, dict]:
    """(architecture name, config dict) of a model, as stored in a manifest."""
    for name, (model_cls, _, _) in ARCHITECTURES.items():
        if type(model) is model_cls:
            return name, model.config.to_dict()
    raise TypeError(f"not a registered architecture: {type(model).__name__}")


def compact(model: GatedNetwork) -> CompactExecutor:
    """The compact inference executor of a model (puts the model in eval mode)."""
    return ARCHITECTURES[describe(model)[0]][2](model)
