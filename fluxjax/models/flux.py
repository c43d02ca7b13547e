"""The FLUX.1 flow transformer (BFL `Flux`, FLUX_REFERENCE.md section 2).

Module names are the BFL checkpoint keys: `double_blocks/img_attn/qkv/kernel` is
`double_blocks.{i}.img_attn.qkv.weight` transposed, stacked over blocks by nn.scan (with
layer_loop="unrolled", block i's parameters are `double_blocks_{i}/...` instead; see
layers.unstack_layers).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fluxjax.config import FluxConfig
from fluxjax.models.layers import (
    Dtype,
    MLPEmbedder,
    Modulation,
    QKNorm,
    attention,
    constrain,
    dense,
    modulate,
    rope,
    layer_stack,
    split_heads,
    timestep_embedding,
)


class SelfAttention(nn.Module):
    """The `qkv`, `norm` and `proj` pieces of one stream's attention (BFL `SelfAttention`)."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.qkv = dense(3 * c.hidden_size, ("embed", "qkv"), "qkv", self.dtype, self.param_dtype, c.qkv_bias)
        self.norm = QKNorm(param_dtype=self.param_dtype)
        self.proj = dense(c.hidden_size, ("heads", "embed"), "proj", self.dtype, self.param_dtype)

    def heads(self, x):
        """(B, L, D) -> q, k, v each (B, L, H, d), q and k RMS-normed."""
        q, k, v = split_heads(self.qkv(x), self.config.num_heads, 3)
        q, k = self.norm(q, k, v.dtype)
        return q, k, v

    def __call__(self, x):
        return self.proj(x)


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear, named `0` and `2` like BFL's nn.Sequential."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = dense(c.mlp_hidden_dim, ("embed", "mlp"), "0", self.dtype, self.param_dtype)(x)
        return dense(c.hidden_size, ("mlp", "embed"), "2", self.dtype, self.param_dtype)(nn.gelu(x, approximate=True))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights, joined only in attention (text first)."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, carry, vec, cos, sin):
        img, txt = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.config
        img_mod = Modulation(c.hidden_size, double=True, name="img_mod", **kw)(vec)
        txt_mod = Modulation(c.hidden_size, double=True, name="txt_mod", **kw)(vec)
        img_attn = SelfAttention(c, name="img_attn", **kw)
        txt_attn = SelfAttention(c, name="txt_attn", **kw)

        q_i, k_i, v_i = img_attn.heads(modulate(img, img_mod[0], img_mod[1]))
        q_t, k_t, v_t = txt_attn.heads(modulate(txt, txt_mod[0], txt_mod[1]))
        joint = [jnp.concatenate(pair, axis=1) for pair in ((q_t, q_i), (k_t, k_i), (v_t, v_i))]
        attn = attention(*joint, cos, sin, self.attention_impl)
        l_txt = txt.shape[1]
        txt_out, img_out = attn[:, :l_txt], attn[:, l_txt:]

        img = img + img_mod[2] * img_attn(img_out)
        img = img + img_mod[5] * MLP(c, name="img_mlp", **kw)(modulate(img, img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2] * txt_attn(txt_out)
        txt = txt + txt_mod[5] * MLP(c, name="txt_mlp", **kw)(modulate(txt, txt_mod[3], txt_mod[4]))
        return (constrain(img), constrain(txt)), None


class SingleStreamBlock(nn.Module):
    """One fused projection for q, k, v and the MLP on the joint [text ; image] sequence."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, vec, cos, sin):
        c = self.config
        d = c.hidden_size
        shift, scale, gate = Modulation(d, double=False, name="modulation", dtype=self.dtype, param_dtype=self.param_dtype)(vec)
        h = dense(3 * d + c.mlp_hidden_dim, ("embed", "qkv"), "linear1", self.dtype, self.param_dtype)(modulate(x, shift, scale))
        q, k, v = split_heads(h[..., : 3 * d], c.num_heads, 3)
        q, k = QKNorm(param_dtype=self.param_dtype, name="norm")(q, k, v.dtype)
        attn = attention(q, k, v, cos, sin, self.attention_impl)
        mlp = nn.gelu(h[..., 3 * d :], approximate=True)
        out = dense(d, ("mlp", "embed"), "linear2", self.dtype, self.param_dtype)(jnp.concatenate([attn, mlp], axis=-1))
        return constrain(x + gate * out), None


class AdaLNModulation(nn.Module):
    """BFL's nn.Sequential(SiLU, Linear): the Linear is item `1`. (B, D) -> (B, 2D)."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec):
        d = self.config.hidden_size
        return dense(2 * d, ("embed", "modulation"), "1", self.dtype, self.param_dtype)(nn.silu(vec))


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the packed latent features."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vec):
        c = self.config
        ada = AdaLNModulation(c, self.dtype, self.param_dtype, name="adaLN_modulation")
        shift, scale = jnp.split(ada(vec)[:, None, :], 2, axis=-1)
        x = modulate(x, shift, scale)
        return dense(c.out_channels, ("embed", "out_features"), "linear", self.dtype, self.param_dtype)(x)


BLOCK_STACKS = ("double_blocks", "single_blocks")  # the parameter entries of the two block stacks


class Flux(nn.Module):
    """FLUX.1 transformer; `apply` takes BFL `Flux.forward`'s arguments.

    Attributes: config, dtype (activations and matmuls), param_dtype, attention_impl
    ("auto", "xla", "cudnn" or "cpu": see layers.dot_product_attention), layer_loop ("scan":
    block parameters stacked, one compiled body; "unrolled": per-block parameters, faster on a
    CPU; see layers.layer_stack; `unstack_layers(params, BLOCK_STACKS)` converts), remat
    (recompute each block's activations in the backward pass instead of keeping them: training
    memory for one more forward; parameters and outputs are unchanged).
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    layer_loop: str = "scan"
    remat: bool = False

    @nn.compact
    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """Predict the flow velocity of the packed image tokens.

        img (B, L_img, in_channels), img_ids (B, L_img, 3), txt (B, L_txt, context_in_dim),
        txt_ids (B, L_txt, 3), timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) or
        None (required when config.guidance_embed). Returns (B, L_img, out_channels) in dtype.
        """
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.guidance_embed and guidance is None:
            raise ValueError("this model has a guidance embedding (dev): pass guidance, e.g. 3.5")
        img = dense(c.hidden_size, ("in_features", "embed"), "img_in", **kw)(img.astype(self.dtype))
        # t*1000 is rounded in the activation dtype first, as both references do in bf16.
        vec = MLPEmbedder(c.hidden_size, name="time_in", **kw)(timestep_embedding(timesteps.astype(self.dtype)))
        if c.guidance_embed:
            vec = vec + MLPEmbedder(c.hidden_size, name="guidance_in", **kw)(timestep_embedding(guidance.astype(self.dtype)))
        vec = vec + MLPEmbedder(c.hidden_size, name="vector_in", **kw)(y.astype(self.dtype))
        txt = dense(c.hidden_size, ("in_features", "embed"), "txt_in", **kw)(txt.astype(self.dtype))

        cos, sin = rope(jnp.concatenate([txt_ids, img_ids], axis=1), c.axes_dim, c.theta)
        block_kw = dict(config=c, attention_impl=self.attention_impl, **kw)
        double_name, single_name = BLOCK_STACKS
        double_block, single_block = DoubleStreamBlock, SingleStreamBlock
        if self.remat:  # prevent_cse=False: inside a scan, XLA cannot merge the recomputation away
            double_block, single_block = (nn.remat(b, prevent_cse=False) for b in (double_block, single_block))
        double = layer_stack(double_block, c.depth, 3, self.layer_loop, double_name, **block_kw)
        single = layer_stack(single_block, c.depth_single_blocks, 3, self.layer_loop, single_name, **block_kw)
        img, txt = double((constrain(img), constrain(txt)), vec, cos, sin)
        x = single(jnp.concatenate([txt, img], axis=1), vec, cos, sin)
        return LastLayer(c, name="final_layer", **kw)(x[:, txt.shape[1] :], vec)
