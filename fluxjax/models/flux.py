"""The FLUX.1 flow transformer (BFL `Flux`; docs/model-reference.md, "The transformer"), and FLUX.2
(BFL flux2 `Flux2`, diffusers `Flux2Transformer2DModel`) through FluxConfig's settings: no
biases (`bias`, `qkv_bias`), SwiGLU MLPs (`mlp`), modulation shared by all blocks of a kind
(`shared_modulation`), no pooled text vector (`vec_in_dim` 0) and RoPE over 4 id columns (`axes_dim`).

Module names are the BFL checkpoint keys (FLUX.1's and flux2's alike): `double_blocks/img_attn/qkv/kernel` is
`double_blocks.{i}.img_attn.qkv.weight` transposed, stacked over blocks by nn.scan.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.config import FluxConfig
from fluxjax.models.layers import (
    Dtype,
    MLPEmbedder,
    Modulation,
    ModulationOut,
    QKNorm,
    apply_rope,
    constrain,
    dense,
    modulate,
    rope,
    scan_layers,
    mlp_activation,
    split_heads,
    timestep_embedding,
    with_precision,
)
from fluxjax.models.attention import attention


class SelfAttention(nn.Module):
    """BFL `SelfAttention`: the fused projection `qkv`, the QK-norm `norm` and the output
    projection `proj` of one stream.

    Calling it attends the stream to itself: x (B, L, D), cos/sin (B, L, d/2) -> (B, L, D).
    The double block instead takes the pieces (`qkv_heads`, then `proj`), because there both
    streams attend over their joint sequence, each with its own projections.
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    quantize: str | None = None  # None, "int8" or "fp8": see layers.dense

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        self.qkv = dense(3 * c.hidden_size, axes=("embed", "qkv"), use_bias=c.qkv_bias, **kw)
        self.norm = QKNorm(param_dtype=self.param_dtype)
        self.proj = dense(c.hidden_size, axes=("heads", "embed"), use_bias=c.bias, **kw)

    def qkv_heads(self, x):
        """(B, L, D) -> q, k, v each (B, L, H, d), q and k RMS-normed and cast to v's dtype."""
        q, k, v = split_heads(self.qkv(x), self.config.num_heads, 3)
        q, k = self.norm(q, k, v.dtype)
        return q, k, v

    def __call__(self, x, cos, sin):
        q, k, v = self.qkv_heads(x)
        return self.proj(attention(q, k, v, cos, sin, implementation=self.attention_impl))


class MLP(nn.Module):
    """Linear -> GELU(tanh) or SwiGLU (config.mlp) -> Linear, named `0` and `2` like BFL's nn.Sequential."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        kw["use_bias"] = c.bias
        x = dense(c.mlp_up_dim, axes=("embed", "mlp"), name="0", **kw)(x)
        return dense(c.hidden_size, axes=("mlp", "embed"), name="2", **kw)(mlp_activation(x, c.mlp))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights, joined only in attention (text first).

    Called as a scan_layers body: ((img (B, L_img, D), txt (B, L_txt, D)), cond, cos, sin
    (B, L_txt + L_img, d/2), ref_kv) -> ((img, txt), kv). cond: vec (B, D), from which the block computes
    its own modulation; with config.shared_modulation, the ((img_mod1, img_mod2), (txt_mod1,
    txt_mod2)) ModulationOut pairs Flux computed once for every double block. ref_kv: None, or
    this block's (k, v) (B, L_ref, H, d) of cached reference tokens both streams attend to as well
    (attention's extra_kv). kv: None, or with emit_kv this block's (k after RoPE, v) of the joint
    [txt ; img] sequence, each (B, L_txt + L_img, H, d).
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    quantize: str | None = None
    emit_kv: bool = False

    @nn.compact
    def __call__(self, carry, cond, cos, sin, ref_kv=None):
        img, txt = carry
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        if c.shared_modulation:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = cond
        else:
            img_mod1, img_mod2 = Modulation(c.hidden_size, double=True, use_bias=c.bias, name="img_mod", **kw)(cond)
            txt_mod1, txt_mod2 = Modulation(c.hidden_size, double=True, use_bias=c.bias, name="txt_mod", **kw)(cond)
        img_attn = SelfAttention(c, attention_impl=self.attention_impl, name="img_attn", **kw)
        txt_attn = SelfAttention(c, attention_impl=self.attention_impl, name="txt_attn", **kw)

        img_q, img_k, img_v = img_attn.qkv_heads(modulate(img, img_mod1.shift, img_mod1.scale))
        txt_q, txt_k, txt_v = txt_attn.qkv_heads(modulate(txt, txt_mod1.shift, txt_mod1.scale))
        q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, cos, sin, implementation=self.attention_impl, extra_kv=ref_kv)
        txt_out, img_out = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        kv = (apply_rope(k, cos, sin), v) if self.emit_kv else None

        img = img + img_mod1.gate * img_attn.proj(img_out)
        img = img + img_mod2.gate * MLP(c, name="img_mlp", **kw)(modulate(img, img_mod2.shift, img_mod2.scale))
        txt = txt + txt_mod1.gate * txt_attn.proj(txt_out)
        txt = txt + txt_mod2.gate * MLP(c, name="txt_mlp", **kw)(modulate(txt, txt_mod2.shift, txt_mod2.scale))
        return (constrain(img), constrain(txt)), kv


class SingleStreamBlock(nn.Module):
    """One fused projection for q, k, v and the MLP on the joint [text ; image] sequence.

    Called as a scan_layers body: (x (B, L, D), cond, cos, sin (B, L, d/2), ref_kv) -> (x, kv). cond:
    vec (B, D), or with config.shared_modulation the ModulationOut Flux computed once for every
    single block. ref_kv, kv: as DoubleStreamBlock's (kv of the L tokens of x).
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    quantize: str | None = None
    emit_kv: bool = False

    @nn.compact
    def __call__(self, x, cond, cos, sin, ref_kv=None):
        c = self.config
        d = c.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        if c.shared_modulation:
            mod = cond
        else:
            mod, _ = Modulation(d, double=False, use_bias=c.bias, name="modulation", **kw)(cond)
        linear1 = dense(3 * d + c.mlp_up_dim, axes=("embed", "qkv"), use_bias=c.qkv_bias, name="linear1", **kw)
        qkv, mlp = jnp.split(linear1(modulate(x, mod.shift, mod.scale)), [3 * d], axis=-1)
        q, k, v = split_heads(qkv, c.num_heads, 3)
        q, k = QKNorm(param_dtype=self.param_dtype, name="norm")(q, k, v.dtype)
        attn = attention(q, k, v, cos, sin, implementation=self.attention_impl, extra_kv=ref_kv)
        linear2 = dense(d, axes=("mlp", "embed"), use_bias=c.bias, name="linear2", **kw)
        out = linear2(jnp.concatenate([attn, mlp_activation(mlp, c.mlp)], axis=-1))
        return constrain(x + mod.gate * out), (apply_rope(k, cos, sin), v) if self.emit_kv else None


class AdaLNModulation(nn.Module):
    """BFL's nn.Sequential(SiLU, Linear): the Linear is item `1`. (B, D) -> (B, 2D)."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec):
        d = self.config.hidden_size
        return dense(2 * d, axes=("embed", "modulation"), name="1", dtype=self.dtype,
                     param_dtype=self.param_dtype, use_bias=self.config.bias)(nn.silu(vec))


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the packed latent features."""

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vec):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = jnp.split(AdaLNModulation(c, name="adaLN_modulation", **kw)(vec)[:, None, :], 2, axis=-1)
        x = modulate(x, shift, scale)
        return dense(c.out_channels, axes=("embed", "out_features"), name="linear", use_bias=c.bias, **kw)(x)


BLOCK_STACKS = ("double_blocks", "single_blocks")  # the parameter entries of the two block stacks


class Flux(nn.Module):
    """FLUX.1 transformer, or FLUX.2 by its config; `apply` takes BFL `Flux.forward`'s arguments.

    Attributes: config, dtype (activations and matmuls), param_dtype, attention_impl
    (one of attention.ATTENTION_IMPLEMENTATIONS: see attention.dot_product_attention), remat
    (recompute each block's activations in the backward pass instead of keeping them: training
    memory for one more forward; parameters and outputs are unchanged), precision (of every
    matmul; None: "highest" for float32, JAX's default otherwise; see layers.matmul_precision),
    quantize (None, or "int8" / "fp8": the blocks' Linears stored weight-only quantized, see
    fluxjax/models/quantize.py; their params are then `kernel` int8/fp8 + `kernel_scale`).
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    precision: str | None = None  # matmul precision; None: from dtype (layers.matmul_precision)
    quantize: str | None = None  # the blocks' Linears weight-only "int8" or "fp8" (fluxjax/models/quantize.py)

    @with_precision
    @nn.compact
    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, ref_kv=None, return_kv=False):
        """Predict the flow velocity of the packed image tokens.

        img (B, L_img, in_channels), img_ids (B, L_img, n), txt (B, L_txt, context_in_dim),
        txt_ids (B, L_txt, n) with n = config.id_columns (3 in FLUX.1, 4 in FLUX.2), timesteps
        (B,) in [0, 1], y (B, vec_in_dim), or None when vec_in_dim is 0 (FLUX.2), guidance (B,)
        or None (required when config.guidance_embed). Returns (B, L_img, out_channels) in dtype.

        ref_kv: None, or the keys and values of reference tokens that every text and image token
        attends to as well, in every block (diffusers' Flux2KleinKVPipeline's cached references):
        ((k, v) of the double blocks, each (depth, B, L_ref, H, d), (k, v) of the single blocks,
        each (depth_single_blocks, B, L_ref, H, d)), keys after RoPE: what return_kv gives for a
        call on the reference tokens alone (as `img`, with no text tokens: then they attend only
        to themselves).
        return_kv: also return, as (out, kv), the image tokens' keys and values in every block in
        ref_kv's layout.
        """
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.guidance_embed and guidance is None:
            raise ValueError("this model has a guidance embedding (dev): pass guidance, e.g. 3.5")
        if (y is None) != (c.vec_in_dim == 0):
            raise ValueError(f"this model takes y (B, {c.vec_in_dim})" if c.vec_in_dim else
                             "this model has no pooled text vector (FLUX.2): pass y=None")
        for name, ids in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            if ids.shape[-1] != c.id_columns:
                raise ValueError(f"{name} has {ids.shape[-1]} columns; this model's RoPE takes {c.id_columns}")
        embed_in = lambda name: dense(  # noqa: E731
            c.hidden_size, axes=("in_features", "embed"), name=name, use_bias=c.bias, **kw)
        img = embed_in("img_in")(img.astype(self.dtype))
        # t*1000 is rounded in the activation dtype first, as both references do in bf16.
        embedder = lambda name: MLPEmbedder(c.hidden_size, use_bias=c.bias, name=name, **kw)  # noqa: E731
        vec = embedder("time_in")(timestep_embedding(timesteps.astype(self.dtype)))
        if c.guidance_embed:
            vec = vec + embedder("guidance_in")(timestep_embedding(guidance.astype(self.dtype)))
        if c.vec_in_dim:
            vec = vec + embedder("vector_in")(y.astype(self.dtype))
        txt = embed_in("txt_in")(txt.astype(self.dtype))
        double_cond, single_cond = _block_conditioning(c, vec, kw)

        cos, sin = rope(jnp.concatenate([txt_ids, img_ids], axis=1), c.axes_dim, c.theta)
        # Only the blocks' Linears are quantized (docs/quantization.md): the embedders and the
        # final layer, a small part of the weights, stay in `dtype`.
        block_kw = dict(config=c, attention_impl=self.attention_impl, quantize=self.quantize, emit_kv=return_kv, **kw)
        double_name, single_name = BLOCK_STACKS
        double_block, single_block = DoubleStreamBlock, SingleStreamBlock
        if self.remat:  # prevent_cse=False: inside a scan, XLA cannot merge the recomputation away
            double_block, single_block = (nn.remat(b, prevent_cse=False) for b in (double_block, single_block))
        double = scan_layers(double_block, c.depth, 3, 1)(name=double_name, **block_kw)
        single = scan_layers(single_block, c.depth_single_blocks, 3, 1)(name=single_name, **block_kw)
        double_ref, single_ref = (None, None) if ref_kv is None else ref_kv
        (img, txt), double_kv = double((constrain(img), constrain(txt)), double_cond, cos, sin, double_ref)
        x, single_kv = single(jnp.concatenate([txt, img], axis=1), single_cond, cos, sin, single_ref)
        out = LastLayer(c, name="final_layer", **kw)(x[:, txt.shape[1] :], vec)
        if not return_kv:
            return out
        # the stacked (layers, B, L_txt + L_img, H, d) keys and values, cut to the image tokens'
        return out, tuple(tuple(t[:, :, txt.shape[1] :] for t in kv) for kv in (double_kv, single_kv))


def _block_conditioning(c: FluxConfig, vec: jax.Array, kw: dict) -> tuple:
    """What the double and the single blocks take as `cond`: vec (B, D) for both (each block
    computes its own modulation), or with c.shared_modulation the modulation computed here once,
    by the modules `double_stream_modulation_img`, `double_stream_modulation_txt` and
    `single_stream_modulation` (BFL flux2's names): ((img_mod1, img_mod2), (txt_mod1, txt_mod2))
    and the single blocks' ModulationOut, each vector (B, 1, D)."""
    if not c.shared_modulation:
        return vec, vec
    def modulation(double: bool, name: str):
        return Modulation(c.hidden_size, double=double, use_bias=c.bias, name=name, **kw)(vec)

    double = (modulation(True, "double_stream_modulation_img"), modulation(True, "double_stream_modulation_txt"))
    single: ModulationOut = modulation(False, "single_stream_modulation")[0]
    return double, single


def param_shapes(model: Flux) -> dict:
    """The parameter tree of `model` as jax.ShapeDtypeStruct, boxed with logical axis names (no
    weights made), the blocks stacked (`double_blocks/...`). `jax.eval_shape` of `init` on one
    image token and one text token."""
    c = model.config
    arg = lambda *shape: jax.ShapeDtypeStruct((1, *shape), jnp.float32)  # noqa: E731
    ids = arg(1, c.id_columns)
    y = arg(c.vec_in_dim) if c.vec_in_dim else None
    args = (arg(1, c.in_channels), ids, arg(1, c.context_in_dim), ids, arg(), y, arg())
    # The key is made inside the trace: no array is placed, which also holds under a mesh of
    # devices that are only described (a TPU topology compiled for from a CPU host).
    return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)["params"]
