"""What executes a network (`compact`: torch, per-image channel subsets; `variants`: dense
variants in OpenVINO or torch), in what precision (`precision`), with what allocator
(`allocator`). Engines read the contract in `models.core` and never import a network."""
