"""Networks by name.

Every factory is registered where it is defined, with `@register_model(Network)`: its record
holds the name, the factory, the network class, and through the class the architecture name
that manifests store and the config class.

Names: a model name (`acs_densenet40`, `fastnet`) is a registered factory; an architecture
name (`densenet`, `fastnet`) is a network class with its config's defaults. `create_model`
resolves a name given by a person (the training CLI, benchmarks), and model names win where
the two meet (`fastnet` is the dense model; the gated one is `acs_fastnet`). A manifest
stores the architecture and its full config, which `build_model` rebuilds exactly.

The registry imports no network: the package that holds them (`models.networks`) registers
them when it is imported, and `models` imports it, so whoever imports from `models` finds
every network registered (as timm's registry never imports its model files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import GatedNetwork


@dataclass(frozen=True)
class ModelRecord:
    """A registered model: its factory and the network class that the factory builds."""

    name: str
    factory: Callable[..., GatedNetwork]
    network: type[GatedNetwork]
    smoke: dict = field(default_factory=dict)  # config overrides of a small instance (tests)

    @property
    def architecture(self) -> str:
        return self.network.architecture

    @property
    def config(self) -> type:
        return self.network.config_class


MODELS: dict[str, ModelRecord] = {}


def register_model(network: type[GatedNetwork], smoke: dict | None = None):
    """Decorator: register a factory under its function name as building `network`."""
    def register(factory: Callable[..., GatedNetwork]) -> Callable[..., GatedNetwork]:
        if factory.__name__ in MODELS:
            raise ValueError(f"model {factory.__name__!r} is registered twice")
        MODELS[factory.__name__] = ModelRecord(factory.__name__, factory, network, smoke or {})
        return factory
    return register


def _networks() -> dict[str, type[GatedNetwork]]:
    """Architecture name -> network class, over the registered models."""
    return {r.architecture: r.network for r in MODELS.values()}


def model_names() -> list[str]:
    return sorted(MODELS)


def architecture_names() -> list[str]:
    return sorted(_networks())


def build_model(architecture: str, config: dict) -> GatedNetwork:
    """A freshly initialized network of an architecture and config (as a manifest stores
    them; JSON lists become tuples)."""
    networks = _networks()
    if architecture not in networks:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(networks)}")
    network = networks[architecture]
    names = {f.name for f in dataclasses.fields(network.config_class)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {architecture} config keys: {unknown}")
    return network(network.config_class(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in config.items()}))


def create_model(name: str, **overrides) -> GatedNetwork:
    """A freshly initialized model by name: a registered model with config overrides, else
    an architecture with its config defaults and the overrides."""
    if name in MODELS:
        return MODELS[name].factory(**overrides)
    if name in _networks():
        return build_model(name, overrides)
    raise ValueError(f"unknown model {name!r}; expected a model ({', '.join(model_names())}) "
                     f"or an architecture ({', '.join(architecture_names())})")


def registered(model: GatedNetwork) -> type[GatedNetwork]:
    """The model's network class, checked to be a registered architecture."""
    if _networks().get(getattr(model, "architecture", None)) is not type(model):
        raise TypeError(f"not a registered architecture: {type(model).__name__}")
    return type(model)


def describe(model: GatedNetwork) -> tuple[str, dict]:
    """(architecture name, config dict) of a model, as stored in a manifest."""
    registered(model)
    return model.architecture, model.config.to_dict()

