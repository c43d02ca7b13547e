"""PyTorch reference models with random weights, for the tests and the benchmarks (needs torch and diffusers)."""
