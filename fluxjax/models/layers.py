"""Building blocks of the FLUX transformer (docs/model-reference.md, "The transformer"), and the
shared parameter helpers every fluxjax model uses (attention: fluxjax/models/attention.py).

Every parameter and hot activation carries logical axis names; the vocabulary, with what each
name means, is fluxjax/models/axes.py (a sharding strategy may map only those names).

Numerics follow the reference: norms, RoPE and softmax statistics in float32, GELU tanh.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.models.quantize import MODES as QUANTIZE_MODES

Dtype = Any


def matmul_precision(dtype: Dtype, precision: str | None = None) -> str | None:
    """The matmul/convolution precision a model computing in `dtype` runs at.

    precision: the model's own setting; None derives it from dtype: "highest" for float32 (a
    float32 model is float32 everywhere: without it a GPU runs float32 matmuls as TF32, about
    5e-4 relative error at full width, and a TPU as bf16 passes), None for other dtypes (JAX's
    default, which bf16 matmuls need). Any name jax.default_matmul_precision takes is allowed.
    """
    if precision is not None:
        return precision
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None


def with_precision(method):
    """Decorate a model's entry method (`__call__`, `encode`, ...): its matmuls, convolutions and
    attention are traced under jax.default_matmul_precision(matmul_precision(self.dtype,
    self.precision)), so every dot and convolution in the lowered HLO carries that precision.
    The module needs `dtype` and `precision` attributes. Place it above @nn.compact."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        precision = matmul_precision(self.dtype, self.precision)
        if precision is None:
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision(precision):
            return method(self, *args, **kwargs)

    return wrapped


def dense(features: int, *, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          quantize: str | None = None, name: str | None = None):
    """nn.Dense whose kernel (in, out) and bias (out,) carry the logical axis names `axes`
    (kernel) and `axes[1:]` (bias). `name` may be left out in `setup`, where the attribute names it.
    quantize: None, or "int8" / "fp8" for a weight-only quantized Linear (QuantizedDense)."""
    if quantize is not None:
        return QuantizedDense(
            features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, quantize=quantize,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), axes[1:]),
            name=name,
        )
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


class QuantizedDense(nn.Dense):
    """A Linear whose kernel is stored weight-only quantized (fluxjax/models/quantize.py): `kernel`
    (in, out) int8 or float8_e4m3fn and `kernel_scale` (out,) float32, the scale's logical axis the
    kernel's output axis. y = (x @ kernel) * kernel_scale + bias.

    The matmul takes the stored values converted to the compute dtype (exact: int8 and e4m3 values
    are bf16 numbers), accumulates in float32, and scales the float32 product per column before the
    one rounding to `dtype`. A subclass of nn.Dense, so live LoRA (fluxjax.lora.live) adds its
    low-rank branch to it as to any Linear. Weights are never initialised: the loader fills them.
    """

    quantize: str = "int8"
    scale_init: Any = nn.initializers.ones_init()

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), QUANTIZE_MODES[self.quantize][0])
        scale = self.param("kernel_scale", self.scale_init, (self.features,), jnp.float32)
        x = inputs.astype(self.dtype)
        y = jax.lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        y = y * scale
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


def scan_layers(block: type[nn.Module], length: int, num_broadcast: int, num_scanned: int = 0):
    """nn.scan over `length` copies of `block`: one compiled body, whatever the depth.

    Parameters get a leading (length,) axis named "layers". The block is called as
    block(carry, *broadcast, *scanned) -> (carry, out), the `num_broadcast` inputs shared by every
    layer, then `num_scanned` inputs stacked over the layers (layer i gets item i; None: nothing);
    the outputs `out` come back stacked the same way (None for none).
    """
    return nn.scan(
        block,
        # "lora": live LoRA adapters (fluxjax.lora.live), stacked over the blocks like their kernels.
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def constrain(x: jax.Array) -> jax.Array:
    """Pin a (batch, length, embed) activation to the strategy's layout (a no-op without a mesh)."""
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


def standardize(x: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over `axes`, in float32 with a two-pass variance (as PyTorch)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


def affine_params(module: nn.Module, features: int, param_dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """A norm's `scale` (ones) and `bias` (zeros), each (features,) with logical axis "norm"."""
    scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (features,), param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (features,), param_dtype)
    return scale, bias


def embedding(num: int, features: int, *, axes: tuple, dtype: Dtype, param_dtype: Dtype, stddev: float,
              name: str | None = None):
    """nn.Embed whose table (num, features), drawn from N(0, stddev^2), carries logical axis names."""
    return nn.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), axes),
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Non-affine LayerNorm over the last axis, statistics in float32 (two-pass, like PyTorch)."""
    return standardize(x, (-1,), eps).astype(x.dtype)


TIMESTEP_EMBEDDING_DIM = 256  # features of the sinusoidal time (and guidance) embedding the MLPEmbedders take


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_EMBEDDING_DIM, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding [cos | sin] of `time_factor * t`.

    t: (B,) in any float dtype. The product with 1000 is taken in t's own dtype (bf16 in the
    reference's bf16 runs: guidance 3.5 becomes 3504), then the rest in float32.
    Returns (B, dim) float32.
    """
    t = (t * time_factor).astype(jnp.float32)
    half = dim // 2
    # The reference rounds the exponent to float32, then takes exp in float32. With t*1000 in
    # the thousands one ulp of a frequency moves the argument by 1e-4, so the frequencies are
    # exp of that float32 exponent, correctly rounded (float64 on the host).
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class MLPEmbedder(nn.Module):
    """out_layer(SiLU(in_layer(x))): (B, in_dim) -> (B, hidden_dim)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        x = dense(self.hidden_dim, axes=("in_features", "embed"), name="in_layer", **kw)(x)
        return dense(self.hidden_dim, axes=("embed", "embed"), name="out_layer", **kw)(nn.silu(x))


def _split_float32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive float64 x as hi + lo, two float32 arrays: hi is float32(x) truncated to 12
    significant bits, lo the float64 remainder rounded to float32.

    hi times an integer position below 4096 is then exact in float32, so the angle
    p * hi + p * lo keeps the accuracy of the float64 tables the reference builds.
    """
    mantissa, exponent = np.frexp(x.astype(np.float32))  # x ~ mantissa * 2**exponent, 0.5 <= mantissa < 1
    hi = np.ldexp(np.trunc(np.ldexp(mantissa, 12)), exponent - 12).astype(np.float32)
    return hi, (x - hi.astype(np.float64)).astype(np.float32)


def rope(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for position ids.

    ids: (B, L, n_axes) positions (index, row, col), any float or int dtype.
    Returns (cos, sin), each (B, L, sum(axes_dim)/2) float32: for each axis a with n_a dims,
    angles p_a * theta^(-2k/n_a), k < n_a/2, concatenated over axes.

    The reference builds these tables in float64. Here the ids are traced values (Flux.apply
    takes them, as BFL's forward does, and the jitted denoise loop sampling.denoise passes them
    as arguments), so the tables are computed in the trace, in float32 (JAX without x64). To
    keep float64 accuracy each frequency is split on the host into float32 hi + lo
    (_split_float32) and cos/sin of the two partial angles are recombined: within float32
    rounding of the float64 tables for positions below 4096.
    """
    omegas = np.concatenate([theta ** (-np.arange(0, n, 2, dtype=np.float64) / n) for n in axes_dim])
    axis_of = np.concatenate([np.full(n // 2, a) for a, n in enumerate(axes_dim)])
    hi, lo = _split_float32(omegas)
    pos = ids.astype(jnp.float32)[..., axis_of]  # (B, L, sum/2)
    a_hi, a_lo = pos * hi, pos * lo
    cos_hi, sin_hi, cos_lo, sin_lo = jnp.cos(a_hi), jnp.sin(a_hi), jnp.cos(a_lo), jnp.sin(a_lo)
    return cos_hi * cos_lo - sin_hi * sin_lo, sin_hi * cos_lo + cos_hi * sin_lo


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x_2m, x_2m+1) by angle m, in float32.

    x: (B, L, H, d); cos, sin: (B, L, d/2). Returns x's shape and dtype.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times a learned `scale`.

    No mean, no bias: FLUX's QK-norm (axis "head_dim") and T5's layer norm (axis "norm").
    """

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    axis: str = "head_dim"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,)), (x.shape[-1],), self.param_dtype
        )
        xf = x.astype(jnp.float32)
        normed = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)).astype(x.dtype)
        return normed * scale.astype(x.dtype)


class QKNorm(nn.Module):
    """RMSNorm of q and k over the head dim, separate scales; both cast to v's dtype."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, dtype):
        q = RMSNorm(param_dtype=self.param_dtype, name="query_norm")(q)
        k = RMSNorm(param_dtype=self.param_dtype, name="key_norm")(k)
        return q.astype(dtype), k.astype(dtype)


class ModulationOut(NamedTuple):
    """One set of adaLN modulation vectors, each (B, 1, dim): a branch's input is
    `modulate(x, shift, scale)` and its output is added to the residual times `gate`."""

    shift: jax.Array
    scale: jax.Array
    gate: jax.Array


class Modulation(nn.Module):
    """`lin`(SiLU(vec)): (B, dim) -> (ModulationOut for attention, ModulationOut for the MLP)
    when `double`, else (ModulationOut, None) (the single block has one set for both).

    The Linear's output is split into chunks of `dim` in the checkpoint's order: shift, scale,
    gate (then shift, scale, gate of the second set).
    """

    dim: int
    double: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str | None = None  # see dense
    use_bias: bool = True

    @nn.compact
    def __call__(self, vec) -> tuple[ModulationOut, ModulationOut | None]:
        n = 6 if self.double else 3
        out = dense(n * self.dim, axes=("embed", "modulation"), name="lin", dtype=self.dtype,
                    param_dtype=self.param_dtype, use_bias=self.use_bias, quantize=self.quantize)(nn.silu(vec))
        chunks = jnp.split(out[:, None, :], n, axis=-1)
        return ModulationOut(*chunks[:3]), ModulationOut(*chunks[3:]) if self.double else None


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """(1 + scale) * LN(x) + shift, LN non-affine with eps 1e-6."""
    return (1 + scale) * layer_norm(x) + shift


def mlp_activation(x: jax.Array, kind: str) -> jax.Array:
    """The MLP nonlinearity on its first Linear's output x (..., F), in x's dtype.

    kind "gelu": GELU(tanh), (..., F) (FLUX.1). "swiglu": silu(gate) * value of the halves
    x = [gate | value], (..., F/2) (FLUX.2, whose first Linear holds both side by side).
    """
    if kind == "swiglu":
        gate, value = jnp.split(x, 2, axis=-1)
        return nn.silu(gate) * value
    return nn.gelu(x, approximate=True)


def split_heads(x: jax.Array, num_heads: int, parts: int) -> list[jax.Array]:
    """(B, L, parts*H*d) with layout (parts, H, d) -> `parts` arrays of (B, L, H, d)."""
    b, l, f = x.shape
    x = x.reshape(b, l, parts, num_heads, f // (parts * num_heads))
    return [x[:, :, i] for i in range(parts)]
