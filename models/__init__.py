"""ACS networks, gates, DGConv, budget policies, MAC accounting and fast execution."""
