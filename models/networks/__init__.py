"""The networks, one a file: each is its units, and each unit its masked reference, MAC
cost and compact steps (`models.core.units`). Importing this package registers every model
(`models.core.registry`)."""

from . import channel_gating, densenet, dfs, fastnet, ranked_fastnet, resnext, slimmable, tiny  # noqa: F401
