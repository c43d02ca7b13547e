"""The FLUX VAE (docs/model-reference.md, "The autoencoder"): a KL autoencoder with 16 latent channels,
and the FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) as a configuration of the same blocks.

FLUX.2 (AutoEncoderConfig preset "flux2": 32 latent channels, `quant_conv`, `batch_norm_eps`) adds
1x1 convs `quant_conv` (on the moments, after the encoder) and `post_quant_conv` (before the
decoder), and `bn`: the running mean and variance of the 2x2-patchified latents, which
fluxjax/models/latents2.py applies between the VAE and the transformer. It has no scale or shift.

Module names mirror BFL's `modules/autoencoder.py`, so the BFL key table is nearly the
identity (fluxjax/loading/vae.py): BFL `encoder.down.{i}.block.{j}.conv1` is the Flax path
`encoder/down_{i}/block_{j}/conv1`, `encoder.mid.attn_1.q` is `encoder/mid/attn_1/q`,
`decoder.up.{i}.upsample.conv` is `decoder/up_{i}/upsample/conv`.

Layout: NHWC everywhere inside (images (B, H, W, 3), latents (B, H/8, W/8, 16)); PyTorch
references are NCHW, so transpose at the boundary when comparing with them.

Numerics: GroupNorm statistics (two-pass mean and variance) and its affine part in float32,
attention logits and softmax in float32; convolutions and the attention matmuls in `dtype`.

Choice: the attention q/k/v/proj_out are `nn.Dense` over the flattened (B, H*W, C) token
sequence rather than 1x1 `nn.Conv`. They are the same matmul; the Dense kernel (C, C) is the
diffusers layout (a `Linear`, which is how the hub's vae/ folder stores them) and the layout of
every other attention projection in fluxjax, so sharding rules and tooling see plain 2-D
kernels. BFL's [C, C, 1, 1] conv weights are squeezed by the `conv1x1` transform when loading.
The ResNet `nin_shortcut` stays a 1x1 Conv: both checkpoint layouts store it as a conv.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.config import AutoEncoderConfig
from fluxjax.models import latents2
from fluxjax.models.attention import blocked_attention
from fluxjax.models.layers import affine_params, dense, standardize, with_precision

Dtype = Any

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# Attention projections act on channels: the same logical axes as a 1x1 conv's (in, out).
ATTN_AXES = ("conv_in", "conv_out")
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp


def conv(features: int, kernel: int, *, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1, padding="SAME_1"):
    """nn.Conv with logically named kernel (kh, kw, in, out) and bias (out,).

    padding "SAME_1": kernel//2 zeros on every side (PyTorch `padding=kernel//2`); or any
    nn.Conv padding ("VALID", explicit pairs).
    """
    if padding == "SAME_1":
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis, contiguous channel groups like PyTorch.

    x: (B, H, W, C) any float dtype. Mean and (two-pass) variance over (H, W, C/groups) in
    float32, normalised and scaled by `scale` (C,), shifted by `bias` (C,), all in float32,
    then cast to `dtype`. Parameters carry the logical axis ("norm",).
    """

    num_groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale, bias = affine_params(self, c, self.param_dtype)
        grouped = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # spatial axes and the within-group axis
        y = standardize(grouped, axes, self.eps).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), x through a 1x1 `nin_shortcut` if the
    width changes. (B, H, W, C_in) -> (B, H, W, out_channels) in `dtype`."""

    out_channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(GroupNorm(self.num_groups, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.swish(GroupNorm(self.num_groups, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    x: (B, H, W, C) -> (B, H, W, C) in `dtype`. q, k, v, proj_out are Dense (C, C) (see the
    module docstring); logits scaled by 1/sqrt(C), softmax in float32.
    """

    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, name="norm", **kw)(x)
        h = h.reshape(b, hh * ww, c)
        q, k, v = (dense(c, axes=ATTN_AXES, name=name, **kw)(h) for name in ("q", "k", "v"))
        # In blocks of queries: all H*W x H*W logits at once are 16 GiB at 2048x2048 pixels (65536
        # positions), more than a v5e chip's HBM (the TPU compiler refused the whole decode at 16.4
        # GiB of temporaries); in blocks the decode compiles to 7.0 GiB (docs/quantization.md, "The VAE decode
        # at 2048 pixels").
        out = blocked_attention(q[:, :, None], k[:, :, None], v[:, :, None], 1 / math.sqrt(c))[:, :, 0]
        out = dense(c, axes=ATTN_AXES, name="proj_out", **kw)(out)
        return x + out.reshape(b, hh, ww, c)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv: (B, H, W, C) -> (B, H/2, W/2, C)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (each pixel to a 2x2 block), then a 3x3 conv: (B, H, W, C) -> (B, 2H, 2W, C)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Level(nn.Module):
    """One resolution level: `block_0..block_{n-1}` ResnetBlocks, then an optional resampler
    named `downsample` (encoder) or `upsample` (decoder), as BFL's `down[i]` / `up[i]`."""

    out_channels: int
    num_blocks: int
    num_groups: int
    resample: str | None  # None, "downsample" or "upsample"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.num_groups, name=f"block_{j}", **kw)(x)
        if self.resample == "downsample":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "upsample":
            x = Upsample(name="upsample", **kw)(x)
        return x


class MidBlock(nn.Module):
    """block_1 (ResnetBlock), attn_1 (AttnBlock), block_2 (ResnetBlock), width unchanged."""

    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.num_groups, name="block_1", **kw)(x)
        x = AttnBlock(self.num_groups, name="attn_1", **kw)(x)
        return ResnetBlock(c, self.num_groups, name="block_2", **kw)(x)


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2*z_channels) in `dtype`,
    f = 2**(len(ch_mult)-1); channels [0:z] are the mean, [z:2z] the log-variance.

    conv_in, down_0..down_{n-1} (num_res_blocks ResnetBlocks each, a Downsample on all but the
    last), mid, norm_out, swish, conv_out.
    """

    config: AutoEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = cfg.norm_num_groups
        h = conv(cfg.ch, 3, name="conv_in", **kw)(x.astype(self.dtype))
        n = len(cfg.ch_mult)
        for i, mult in enumerate(cfg.ch_mult):
            resample = "downsample" if i != n - 1 else None
            level = Level(cfg.ch * mult, num_blocks=cfg.num_res_blocks, num_groups=g, resample=resample, name=f"down_{i}", **kw)
            h = level(h)
        h = MidBlock(g, name="mid", **kw)(h)
        h = nn.swish(GroupNorm(g, name="norm_out", **kw)(h))
        return conv(2 * cfg.z_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) (un-normalised) -> image (B, h*f, w*f, out_ch) in `dtype`.

    conv_in, mid, then levels up_{n-1} .. up_0 (num_res_blocks+1 ResnetBlocks each, an Upsample
    on all but up_0; `up_i` has width ch*ch_mult[i], as BFL stores them), norm_out, swish,
    conv_out.
    """

    config: AutoEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = cfg.norm_num_groups
        h = conv(cfg.ch * cfg.ch_mult[-1], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(g, name="mid", **kw)(h)
        for i in reversed(range(len(cfg.ch_mult))):
            resample = "upsample" if i != 0 else None
            level = Level(cfg.ch * cfg.ch_mult[i], num_blocks=cfg.num_res_blocks + 1, num_groups=g, resample=resample,
                          name=f"up_{i}", **kw)
            h = level(h)
        h = nn.swish(GroupNorm(g, name="norm_out", **kw)(h))
        return conv(cfg.out_ch, 3, name="conv_out", **kw)(h)


class LatentBatchNorm(nn.Module):
    """FLUX.2's `bn` (a BatchNorm2d without affine part): `running_mean` (zeros) and `running_var`
    (ones), each (features,) with logical axis "norm". Only the statistics; never updated here.

    Calling it returns them as the mapping latents2.normalize / denormalize take.
    """

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        init = {"running_mean": nn.initializers.zeros_init(), "running_var": nn.initializers.ones_init()}
        return {name: self.param(name, nn.with_logical_partitioning(fn, ("norm",)), (self.features,), self.param_dtype)
                for name, fn in init.items()}


class AutoEncoder(nn.Module):
    """The FLUX VAE: `encoder` and `decoder`, with the latent normalisation of the reference.

    config:      AutoEncoderConfig (preset "flux" for FLUX.1's VAE, "flux2" for FLUX.2's).
    dtype:       compute dtype of convolutions and attention matmuls (float32 or bfloat16).
    param_dtype: dtype of the parameters.
    precision:   of every convolution and matmul (None: "highest" for float32, JAX's default
                 otherwise; see layers.matmul_precision).

    Use `model.apply({"params": p}, x, method="encode")` and `..., z, method="decode")`;
    `__call__(x)` is decode(encode(x)), used by `init` to create every parameter.
    """

    config: AutoEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str | None = None  # matmul precision; None: from dtype (layers.matmul_precision)

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.quant_conv:
            self.quant_conv = conv(2 * cfg.z_channels, 1, name=None, **kw)
            self.post_quant_conv = conv(cfg.z_channels, 1, name=None, **kw)
        if cfg.batch_norm_eps is not None:
            self.bn = LatentBatchNorm(latents2.PATCH * latents2.PATCH * cfg.z_channels, param_dtype=self.param_dtype)

    @with_precision
    def encode(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images to normalised latents.

        x:   (B, H, W, in_channels) **NHWC**, pixel values in [-1, 1] (u8 / 127.5 - 1), any float
             dtype; H and W multiples of 2**(len(ch_mult)-1) (8 for FLUX).
        key: None for the posterior mean (BFL's default, diffusers' `latent_dist.mode()`); a
             PRNG key to sample `mean + exp(0.5*logvar) * eps` instead (diffusers'
             `latent_dist.sample()`), logvar clamped to [-30, 20] as diffusers does, with
             eps = jax.random.normal(key, mean.shape, float32) drawn in this NHWC layout.
        The moments pass `quant_conv` first when the config has one (FLUX.2).
        Returns (B, H/8, W/8, z_channels) float32: `scale_factor * (z - shift_factor)` (z itself
        for FLUX.2, whose normalisation is latents2's batch norm on patchified latents).
        """
        moments = self.encoder(x)
        if self.config.quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        z = mean
        if key is not None:
            logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return self.config.scale_factor * (z - self.config.shift_factor)

    @with_precision
    def decode(self, z: jax.Array) -> jax.Array:
        """Normalised latents to pixels.

        z: (B, h, w, z_channels) NHWC normalised latents (what `encode` returns and the flow
           model samples), any float dtype. `z / scale_factor + shift_factor` is applied first
           (in float32), before `post_quant_conv` (FLUX.2) and the decoder's conv_in, as in BFL's
           `AutoEncoder.decode` and the diffusers Flux pipelines.
        Returns (B, h*8, w*8, out_ch) float32 pixels, nominally in [-1, 1] but **not clamped**
        (clip to [-1, 1] before converting to u8, as the reference does).
        """
        z = z.astype(jnp.float32) / self.config.scale_factor + self.config.shift_factor
        if self.config.quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    @with_precision
    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """decode(encode(x, key)): (B, H, W, in_channels) -> (B, H, W, out_ch) float32.

        With a latent batch norm (FLUX.2) the latents go to the transformer's tokens and back
        (latents2.to_tokens / from_tokens) in between, so `init` creates `bn` too; H and W are
        then multiples of 16.
        """
        z = self.encode(x, key)
        if self.config.batch_norm_eps is not None:
            _, h, w, _ = z.shape
            bn, eps = self.bn(), self.config.batch_norm_eps
            z = latents2.from_tokens(latents2.to_tokens(z, bn, eps), bn, eps, h // latents2.PATCH, w // latents2.PATCH)
        return self.decode(z)


def param_shapes(model: AutoEncoder) -> dict:
    """The model's parameter tree of jax.ShapeDtypeStruct (boxed with logical axis names), without
    allocating or initialising anything: `jax.eval_shape` of `init` on the smallest valid image."""
    f = model.config.downsample_factor * (latents2.PATCH if model.config.batch_norm_eps is not None else 1)
    x = jax.ShapeDtypeStruct((1, f, f, model.config.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
