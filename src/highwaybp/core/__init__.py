"""The algorithm, model-agnostic: residual maps (K), scans, the iteration, the chain."""
