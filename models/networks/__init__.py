"""The networks, one a file, each with its compact executor beside it (`<name>_compact.py`).
Importing this package registers every model (`models.core.registry`)."""

from . import channel_gating, densenet, dfs, fastnet, resnext, slimmable  # noqa: F401
