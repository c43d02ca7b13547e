"""Parameter counts from the config fields alone, beside the exact counts of the abstract shapes.

The planner's bytes come from `jax.eval_shape` of each model (fluxjax/plan/planner.py); these
formulas say where the parameters are, and `fluxjax plan` prints both (the tests hold them
equal for every FLUX.1 and FLUX.2 preset). They follow the parameter trees of
fluxjax/models/flux.py and fluxjax/models/qwen3.py; a Linear (i -> o) holds i*o weights, plus o
when it has a bias.
"""

from __future__ import annotations

from fluxjax.config import FluxConfig
from fluxjax.models.layers import TIMESTEP_EMBEDDING_DIM
from fluxjax.models.qwen3 import Qwen3Config


def _linear(features_in: int, features_out: int, bias: bool) -> int:
    return features_in * features_out + (features_out if bias else 0)


def transformer_count(cfg: FluxConfig) -> int:
    """Parameters of the FLUX transformer of `cfg` (FLUX.1: GELU MLPs, biases, per-block
    modulation, a pooled-vector embedder; FLUX.2: SwiGLU with the gate fused into the MLP's first
    Linear (cfg.mlp_up_dim outputs), no biases, one modulation per block kind).

    With D = hidden_size, M = mlp_hidden_dim, U = mlp_up_dim, d = head_dim:
      double block  per stream: qkv (D, 3D) + RMSNorm scales of q and k (2d) + proj (D, D)
                    + MLP (D, U), (M, D) [+ its modulation (D, 6D) unless shared]
      single block  linear1 (D, 3D + U) + linear2 (D + M, D) + 2d [+ modulation (D, 3D)]
      shared        two double modulations (D, 6D) and one single (D, 3D)
      embedders     img_in, txt_in; time (and guidance, pooled vector) MLPEmbedders (in, D), (D, D)
      final layer   adaLN (D, 2D) and linear (D, out_channels)
    """
    d, m, u, bias = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.mlp_up_dim, cfg.bias
    norms = 2 * cfg.head_dim
    double_mod, single_mod = _linear(d, 6 * d, bias), _linear(d, 3 * d, bias)
    stream = _linear(d, 3 * d, cfg.qkv_bias) + norms + _linear(d, d, bias) + _linear(d, u, bias) + _linear(m, d, bias)
    double = 2 * stream
    single = _linear(d, 3 * d + u, cfg.qkv_bias) + _linear(d + m, d, bias) + norms
    if cfg.shared_modulation:
        shared = 2 * double_mod + single_mod
    else:
        shared, double, single = 0, double + 2 * double_mod, single + single_mod
    embedder = lambda features: _linear(features, d, bias) + _linear(d, d, bias)  # noqa: E731
    embed = (_linear(cfg.in_channels, d, bias) + _linear(cfg.context_in_dim, d, bias)
             + embedder(TIMESTEP_EMBEDDING_DIM) * (2 if cfg.guidance_embed else 1)
             + (embedder(cfg.vec_in_dim) if cfg.vec_in_dim else 0))
    final = _linear(d, 2 * d, bias) + _linear(d, cfg.out_channels, bias)
    return cfg.depth * double + cfg.depth_single_blocks * single + shared + embed + final


def text_encoder_count(cfg: Qwen3Config) -> int:
    """Parameters of the Qwen3 (Mistral with qk_norm False) encoder of `cfg` as fluxjax holds it:
    the token embeddings, every decoder layer and the final norm (no lm_head: the encoder gives
    hidden states). Per layer, with D = hidden_size, H/K query/key-value heads of d features and
    I = intermediate_size: two RMSNorms (2D), q (D, Hd), k and v (D, Kd), o (Hd, D) (biases when
    attention_bias), q/k RMSNorms (2d, Qwen3 only), gate, up (D, I) and down (I, D)."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    bias = cfg.attention_bias
    attention = _linear(d, q, bias) + 2 * _linear(d, kv, bias) + _linear(q, d, bias)
    layer = 2 * d + attention + (2 * cfg.head_dim if cfg.qk_norm else 0) + 3 * d * cfg.intermediate_size
    return cfg.vocab_size * d + cfg.num_hidden_layers * layer + d
