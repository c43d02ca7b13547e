"""The T5 v1.1 encoder (docs/model-reference.md, "Text encoders"), as transformers' `T5EncoderModel`.

FLUX reads `last_hidden_state` of the XXL encoder and passes no attention mask, so neither
does this module: every position (pad tokens included) attends to every other.

Parameter tree (names mirror the transformers keys, so fluxjax/loading/t5.py is nearly the identity):

  shared/embedding                          (vocab, d_model)          ("vocab", "embed")
  relative_attention_bias/embedding         (buckets, heads)          (None, "heads")
  block/layer_0/layer_norm/scale            (layers, d_model)         ("layers", "norm")
  block/layer_0/SelfAttention/{q,k,v}/kernel (layers, d_model, H*d_kv) ("layers", "embed", "heads")
  block/layer_0/SelfAttention/o/kernel      (layers, H*d_kv, d_model) ("layers", "heads", "embed")
  block/layer_1/layer_norm/scale            (layers, d_model)         ("layers", "norm")
  block/layer_1/DenseReluDense/{wi_0,wi_1}/kernel (layers, d_model, d_ff) ("layers", "embed", "mlp")
  block/layer_1/DenseReluDense/wo/kernel    (layers, d_ff, d_model)   ("layers", "mlp", "embed")
  final_layer_norm/scale                    (d_model,)                ("norm",)

The relative position bias has no bucket axis name: the table is tiny and is best replicated.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.config import T5Config
from fluxjax.models.attention import dot_product_attention
from fluxjax.models.layers import RMSNorm, constrain, dense, embedding, scan_layers, with_precision

Dtype = Any


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of every (query, key) pair, as transformers computes it.

    Half the buckets are for keys after the query, half for keys before; within each half,
    distances below num_buckets/4 get a bucket each and larger ones share logarithmically wider
    buckets up to max_distance, beyond which all fall in the last bucket.
    Returns (length, length) int32, entry [q, k] for relative position k - q.

    Built on the host (the length is static under jit). The logarithm is taken in float32 like
    the reference's: the bucket is a truncation, and at the distances where the exact value is
    an integer (16, 32, 64 for XXL's settings) another precision may land one bucket lower.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    max_exact = half // 2
    is_small = dist < max_exact
    # Distances below max_exact are masked out before the log, so log(0) never happens.
    scaled = np.maximum(dist, max_exact).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (
        np.log(scaled) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, dist, large)).astype(np.int32)


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive position bias and no 1/sqrt(d) scaling.

    T5 folded the scaling into the initialisation of q, so the trained weights expect raw
    dot products. x: (B, L, d_model) in `dtype`; position_bias: (H, L, L) float32.
    Returns (B, L, d_model) in `dtype`. Logits and softmax in float32.
    """

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.dot_product_attention
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        b, l, _ = x.shape

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, quantize=self.quantize)

        def proj(name):
            y = dense(inner, axes=("embed", "heads"), name=name, **kw)(x)
            return y.reshape(b, l, cfg.num_heads, cfg.d_kv)

        q, k, v = proj("q"), proj("k"), proj("v")
        out = dot_product_attention(q, k, v, bias=position_bias, scale=1.0, implementation=self.attention_impl)
        return dense(cfg.d_model, axes=("heads", "embed"), name="o", **kw)(out)


class T5DenseGatedGelu(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): (B, L, d_model) -> (B, L, d_model) in `dtype`."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, quantize=self.quantize)
        gate = dense(cfg.d_ff, axes=("embed", "mlp"), name="wi_0", **kw)(x)
        lin = dense(cfg.d_ff, axes=("embed", "mlp"), name="wi_1", **kw)(x)
        # Elementwise in float32 (free next to the matmuls): bf16 tanh would add its own error.
        h = (jax.nn.gelu(gate.astype(jnp.float32), approximate=True) * lin.astype(jnp.float32)).astype(self.dtype)
        return dense(cfg.d_model, axes=("mlp", "embed"), name="wo", **kw)(h)


class T5LayerSelfAttention(nn.Module):
    """x + SelfAttention(layer_norm(x)) (pre-norm residual)."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.dot_product_attention
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        h = RMSNorm(eps=self.config.layer_norm_epsilon, param_dtype=self.param_dtype, axis="norm", name="layer_norm")(x)
        attn = T5Attention(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention_impl=self.attention_impl, quantize=self.quantize, name="SelfAttention")
        return x + attn(h, position_bias)


class T5LayerFF(nn.Module):
    """x + DenseReluDense(layer_norm(x)) (pre-norm residual; the name is transformers')."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = RMSNorm(eps=self.config.layer_norm_epsilon, param_dtype=self.param_dtype, axis="norm", name="layer_norm")(x)
        mlp = T5DenseGatedGelu(self.config, dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize,
                               name="DenseReluDense")
        return x + mlp(h)


class T5Block(nn.Module):
    """One encoder layer, in nn.scan's (carry, output) form.

    x: (B, L, d_model) in `dtype`, the carry; position_bias: (H, L, L) float32, the same for
    every layer (broadcast by the scan). Returns (x, None).
    """

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.dot_product_attention
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        x = T5LayerSelfAttention(self.config, attention_impl=self.attention_impl, name="layer_0", **kw)(x, position_bias)
        x = T5LayerFF(self.config, name="layer_1", **kw)(constrain(x))
        return constrain(x), None


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: input_ids (B, L) integer -> last_hidden_state (B, L, d_model) in `dtype`.

    dtype: activations and matmuls; param_dtype: stored parameters. Norm statistics, attention
    logits, the position bias and the softmax are float32 whatever `dtype` is. quantize: None, or
    "int8" / "fp8": the layers' Linears stored weight-only quantized (fluxjax/models/quantize.py).
    """

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.dot_product_attention
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense
    precision: str | None = None  # matmul precision; None: from dtype (layers.matmul_precision)

    @with_precision
    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        length = input_ids.shape[1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), stddev=1.0, name="shared", **kw)(input_ids)
        x = constrain(x)

        # One table lookup for all layers: transformers computes the bias in block 0 and
        # hands it on, so its single parameter lives here rather than in the scanned block.
        buckets = relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = embedding(
            cfg.relative_attention_num_buckets, cfg.num_heads, axes=(None, "heads"), dtype=jnp.float32,
            param_dtype=self.param_dtype, stddev=1.0, name="relative_attention_bias",
        )(jnp.asarray(buckets))
        position_bias = jnp.transpose(bias, (2, 0, 1))  # (H, L, L)

        blocks = scan_layers(T5Block, cfg.num_layers, 1)
        # The layers' Linears are quantized when asked; the embeddings and norms stay in `dtype`.
        x, _ = blocks(cfg, attention_impl=self.attention_impl, quantize=self.quantize, name="block", **kw)(x, position_bias)
        return RMSNorm(cfg.layer_norm_epsilon, self.param_dtype, "norm", name="final_layer_norm")(x)


def param_shapes(model: T5Encoder) -> dict:
    """The parameter tree of `model` as jax.ShapeDtypeStruct, boxed with logical axis names (no
    weights made): `jax.eval_shape` of `init` on one token."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
