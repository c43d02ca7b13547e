"""The logical axis names of fluxjax's models: the whole vocabulary a sharding strategy may map.

Every parameter carries one of these names per dimension (`nn.with_logical_partitioning`; None
for a dimension no strategy should split), and the hot activations carry them through
`nn.with_logical_constraint`. A strategy file (fluxjax/configs/sharding/*.toml) maps these names
to mesh axes; fluxjax.parallel.strategies refuses any other name, so a misspelling is an error, not a
silently replicated axis. tests/test_sharding.py checks that the transformer, T5, CLIP and the
VAE use no name outside this list.
"""

from __future__ import annotations

# Parameters.
LAYERS = "layers"
EMBED = "embed"
MLP = "mlp"
QKV = "qkv"
HEADS = "heads"
MODULATION = "modulation"
HEAD_DIM = "head_dim"
IN_FEATURES = "in_features"
OUT_FEATURES = "out_features"
VOCAB = "vocab"
CONV_HEIGHT = "conv_height"
CONV_WIDTH = "conv_width"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
NORM = "norm"

# Activations.
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_SEQ = "activation_seq"

PARAMETER_AXES: dict[str, str] = {
    LAYERS: "the stacked block axis nn.scan adds (19/38 FLUX blocks, 24 T5 or 12 CLIP layers)",
    EMBED: "the model width: 3072 in FLUX, d_model in T5, the hidden size in CLIP",
    MLP: "MLP hidden features (the output of an MLP's first kernel, the input of its last)",
    QKV: "fused q/k/v output features (q/k/v plus MLP input in FLUX's single blocks)",
    HEADS: "attention features, heads x head_dim (T5/CLIP q/k/v outputs, every output projection's input; T5's bias table)",
    MODULATION: "adaLN modulation outputs (the shift/scale/gate chunks side by side)",
    HEAD_DIM: "per-head vectors (the QK-norm scales)",
    IN_FEATURES: "inputs of the embedders (packed latents, T5 features, CLIP vector, sinusoids)",
    OUT_FEATURES: "outputs of the final projection (packed latent channels)",
    VOCAB: "token embedding rows",
    CONV_HEIGHT: "VAE convolution kernel height",
    CONV_WIDTH: "VAE convolution kernel width",
    CONV_IN: "VAE convolution (and attention projection) input channels",
    CONV_OUT: "VAE convolution (and attention projection) output channels",
    NORM: "norm scales and biases over channels",
}

ACTIVATION_AXES: dict[str, str] = {
    ACTIVATION_BATCH: "the batch of images or prompts: a strategy's data axes",
    ACTIVATION_LENGTH: "tokens (image patches and text) of a (batch, length, embed) activation",
    ACTIVATION_EMBED: "the width of a (batch, length, embed) activation",
    ACTIVATION_HEADS: "the head axis of q, k and v inside attention",
    ACTIVATION_SEQ: "tokens of FLUX's joint attention under sequence parallelism (models/sequence_parallel.py)",
}

AXES: dict[str, str] = {**PARAMETER_AXES, **ACTIVATION_AXES}
"""Every logical axis name, with what it is."""
