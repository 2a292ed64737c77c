"""The parts ACS adds: DGConv2d (learned channel grouping) and gate networks."""
