"""Gated networks and what serves them.

core/      the contract every network keeps (base.py), budget policies and plans, MAC
           accounting, gathering and BN folding, the compact executor engine, the registry,
           checkpoints, serving precision
acs/       the ACS parts: DGConv2d (ACS-DG) and the gates (ACS-GN, cheap)
networks/  one network a file, its compact executor beside it (<name>_compact.py)
"""
