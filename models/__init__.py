"""Gated networks and what serves them.

core/      the contract every network keeps (base.py: a network is its units, units.py:
           each described once), budget policies and plans, MAC accounting, gathering and BN
           folding, the registry, checkpoints
acs/       the ACS parts: DGConv2d (ACS-DG) and the gates (ACS-GN, cheap)
networks/  one network a file: its units, their reference, cost and compact steps
engines/   what executes a network: the torch compact executor (per-image channel subsets),
           the variant executor over OpenVINO or torch (width levels, dense models), serving
           precision and allocator tuning; engines read the contract in core/, never a network

Networks and engines import `core`, never each other. Importing this package registers every
network (`networks/`), so `core`'s registry imports nothing above it.
"""

from . import networks  # noqa: F401
