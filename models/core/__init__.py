"""Infrastructure every network uses: the contract, budgets, MACs, execution, registry, checkpoints."""
