"""Flax modules only: FLUX layers and transformer, T5, CLIP, the autoencoder, sequence parallelism, and the quantized weights they consume."""
