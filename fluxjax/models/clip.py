"""The CLIP text transformer (CLIP-L/14 text tower), as FLUX uses it for the pooled vector `y`.

Same math as transformers' `CLIPTextModel` (docs/model-reference.md, "Text encoders"):

    h = token_embedding[ids] + position_embedding[:L]
    for each layer:  h = h + out_proj(causal_attention(layer_norm1(h)))
                     h = h + fc2(act(fc1(layer_norm2(h))))
    last_hidden_state = final_layer_norm(h)
    pooler_output     = last_hidden_state[b, eos_position(ids[b])]

with pre-LN layers, a causal mask and no padding mask (FLUX passes no attention_mask), attention
scale 1/sqrt(head_dim), act = quick_gelu x*sigmoid(1.702x) (or exact gelu), LayerNorm eps from
the config. The pooled position follows transformers exactly: with the legacy config value
`eos_token_id == 2` (the FLUX checkpoint) it is argmax(ids), the first occurrence of the largest
id, i.e. the first <|endoftext|> (49407); otherwise the first position equal to `eos_token_id`.
It is `pooler_output`, not the `text_projection` of CLIPTextModelWithProjection.

Parameter names mirror the transformers module names (token_embedding, layers/self_attn/q_proj,
layer_norm1, mlp/fc1, final_layer_norm, ...), so the key table in fluxjax/loading/clip.py is nearly the
identity. The layers are stacked with nn.scan: every leaf under `layers` has a leading axis of
length num_layers (logical axis "layers").

Numerics: parameters and matmuls in `dtype`/`param_dtype`; LayerNorm statistics and affine in
float32 (cast back once, like PyTorch's fused LayerNorm), attention logits and softmax in
float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.config import CLIPConfig
from fluxjax.models.attention import dot_product_attention
from fluxjax.models.layers import (affine_params, constrain, dense, embedding, scan_layers, standardize,
                                   with_precision)

Dtype = Any

LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), CLIP's activation, op by op in x's dtype (as transformers does)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":  # transformers' "gelu": the exact erf form, one fused op (float32 inside)
        return lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)
    raise ValueError(f"CLIP hidden_act {name!r} is not supported (quick_gelu or gelu)")


class LayerNorm(nn.Module):
    """Affine LayerNorm over the last axis (PyTorch nn.LayerNorm semantics).

    x: (..., D) any float dtype -> same shape, `dtype`. Mean, variance (two-pass), scale and
    bias applied in float32, one rounding at the end. Params: scale (D,), bias (D,), axis "norm".
    """

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = affine_params(self, x.shape[-1], self.param_dtype)
        y = standardize(x, (-1,), self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention.

    x: (B, L, D) in `dtype` -> (B, L, D) in `dtype`. Params: {q,k,v}_proj kernel (D, D) axes
    (embed, heads), bias (D,); out_proj kernel (D, D) axes (heads, embed), bias (D,).
    Head h owns features [h*head_dim, (h+1)*head_dim) of q, k and v, as in PyTorch's view.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, l, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def heads(name):
            return dense(d, axes=("embed", "heads"), name=name, **kw)(x).reshape(b, l, self.num_heads, d // self.num_heads)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        out = dot_product_attention(q, k, v, causal=True, implementation=self.attention_impl)
        return dense(d, axes=("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))): (B, L, D) -> (B, L, D) in `dtype`; fc1 axes (embed, mlp), fc2 (mlp, embed)."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(x)
        x = _activation(self.hidden_act)(x)
        return dense(d, axes=("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """One pre-LN transformer layer, written as a scan body: (h, None) -> (h, None).

    h: (B, L, D) in `dtype`. Params: layer_norm1, self_attn (CLIPAttention), layer_norm2,
    mlp (CLIPMLP); under nn.scan each gets a leading (num_layers,) axis named "layers".
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(h)
        x = CLIPAttention(cfg.num_heads, attention_impl=self.attention_impl, name="self_attn", **kw)(x)
        h = constrain(h + x)
        x = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(h)
        x = CLIPMLP(cfg.intermediate_size, hidden_act=cfg.hidden_act, name="mlp", **kw)(x)
        h = constrain(h + x)
        return h, None


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The position transformers' CLIPTextModel pools at, per sequence: (B, L) int -> (B,) int32.

    eos_token_id == 2 (legacy configs, FLUX's): argmax of the ids, first occurrence of the
    largest id. Otherwise: the first position whose id equals eos_token_id (0 if none does,
    as torch's argmax of an all-zero row).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: token ids -> (last_hidden_state, pooler_output).

    config: CLIPConfig (fluxjax.config). dtype: compute dtype (activations, matmul inputs);
    param_dtype: dtype of the parameters. attention_impl: one of attention.ATTENTION_IMPLEMENTATIONS
    (see attention.dot_product_attention). precision: of every matmul (None: from dtype, see
    layers.matmul_precision).

    __call__(input_ids):
      input_ids: (B, L) integer token ids, L <= config.max_position_embeddings (77 for CLIP-L;
        FLUX always passes exactly 77, padded with <|endoftext|>). No attention mask.
      Returns (last_hidden_state (B, L, D), pooler_output (B, D)), both in `dtype`;
      D = config.hidden_size (768 for CLIP-L). FLUX's `y`/`vec` is pooler_output.

    Parameters (logical axes): token_embedding/embedding (vocab, embed),
    position_embedding (max_positions, D) (None, embed), layers/... (stacked, see
    CLIPEncoderLayer), final_layer_norm/{scale,bias} (norm,).
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    precision: str | None = None  # matmul precision; None: from dtype (layers.matmul_precision)

    @with_precision
    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        b, l = input_ids.shape
        if l > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP input has {l} tokens, more than max_position_embeddings={cfg.max_position_embeddings}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        token_embedding = embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), stddev=0.02,
                                    name="token_embedding", **kw)
        position_embedding = self.param(
            "position_embedding",
            # 77 rows: never worth sharding, so the row axis is left replicated (None).
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (cfg.max_position_embeddings, cfg.hidden_size),
            self.param_dtype,
        )
        h = token_embedding(input_ids) + position_embedding[:l].astype(self.dtype)[None]
        h = constrain(h.astype(self.dtype))

        layers = scan_layers(CLIPEncoderLayer, cfg.num_layers, 0)
        h, _ = layers(cfg, attention_impl=self.attention_impl, name="layers", **kw)(h)

        last_hidden_state = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(h)
        pos = pooled_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]
        return last_hidden_state, pooled


def param_shapes(model: CLIPTextEncoder) -> dict:
    """The parameter tree of `model` as jax.ShapeDtypeStruct, boxed with logical axis names (no
    weights made): `jax.eval_shape` of `init` on one full-length sequence."""
    ids = jax.ShapeDtypeStruct((1, model.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
