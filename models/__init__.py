"""Gated networks and what serves them.

core/      the contract every network keeps (base.py: a network is its units, units.py:
           each described once), budget policies and plans, MAC accounting, gathering and BN
           folding, the compact executor, the registry, checkpoints, serving precision
acs/       the ACS parts: DGConv2d (ACS-DG) and the gates (ACS-GN, cheap)
networks/  one network a file: its units, their reference, cost and compact steps
"""
