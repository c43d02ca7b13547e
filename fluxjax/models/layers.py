"""Building blocks of the FLUX transformer (docs/architecture.md, "The transformer"), and the
shared parameter helpers every fluxjax model uses.

Every parameter and hot activation carries logical axis names; the vocabulary, with what each
name means, is fluxjax/models/axes.py (a sharding strategy may map only those names).

Numerics follow the reference: norms, RoPE and softmax statistics in float32, GELU tanh.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.errors import UsageError
from fluxjax.kernels import cpu_attention
from fluxjax.models import sequence_parallel
from fluxjax.models.quantize import MODES as QUANTIZE_MODES

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "xla_blocked", "cudnn", "cpu", "splash")


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
    one rounding to `dtype`. A subclass of nn.Dense, so live LoRA (fluxjax.lora.adapters.live) adds its
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


def scan_layers(block: type[nn.Module], length: int, num_broadcast: int):
    """nn.scan over `length` copies of `block`: one compiled body, whatever the depth.

    Parameters get a leading (length,) axis named "layers". The block is called as
    block(carry, *broadcast) -> (carry, None), the `num_broadcast` inputs shared by every layer.
    """
    return nn.scan(
        block,
        # "lora": live LoRA adapters (fluxjax.lora.adapters), stacked over the blocks like their kernels.
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


LAYER_LOOPS = ("scan", "unrolled")


def layer_stack(block: type[nn.Module], length: int, num_broadcast: int, layer_loop: str, name: str, **kwargs):
    """`length` copies of `block(**kwargs)` applied in sequence: stack(carry, *broadcast) -> carry.

    layer_loop "scan": one nn.scan (see scan_layers), parameters stacked under `name`.
    layer_loop "unrolled": one module per layer, parameters under f"{name}_{i}" (the layout
        `unstack_layers` makes). Compiles a body per layer, but reads each weight in place: a
        scanned layer's weights are sliced out of the stack, which XLA:CPU does by copying every
        weight at every call (about 9% of a denoising step on a 2-core CPU).
    Must be called from a compact method, where the modules it makes become children.
    """
    if layer_loop == "scan":
        scanned = scan_layers(block, length, num_broadcast)(name=name, **kwargs)
        return lambda carry, *broadcast: scanned(carry, *broadcast)[0]
    if layer_loop != "unrolled":
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    layers = [block(name=f"{name}_{i}", **kwargs) for i in range(length)]

    def unrolled(carry, *broadcast):
        for layer in layers:
            carry, _ = layer(carry, *broadcast)
        return carry

    return unrolled


def unstack_layers(params: dict, names: Sequence[str]) -> dict:
    """Parameters of "scan" stacks -> the "unrolled" layout of `layer_stack`.

    params: a parameter dict of single-device jax arrays; for each of `names`, a subtree whose
    leaves have a leading (layers,) axis becomes entries f"{name}_{i}" holding layer i's slices
    (new arrays on the same device). Other entries are passed through unchanged.
    """
    out = {k: v for k, v in params.items() if k not in names}
    for name in names:
        # Sliced on the host: indexing a jax array would compile a slice per leaf shape.
        host = jax.tree.map(np.asarray, params[name])
        devices = jax.tree.map(lambda a: a.sharding, params[name])
        for i in range(jax.tree.leaves(host)[0].shape[0]):
            out[f"{name}_{i}"] = jax.tree.map(lambda a, where: jax.device_put(a[i], where), host, devices)
    return out


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


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0) -> jax.Array:
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


def dot_product_attention(q, k, v, *, bias=None, causal: bool = False, scale: float | None = None,
                          implementation: str = "auto") -> jax.Array:
    """softmax(scale * q k^T + bias [+ causal mask]) v: the one attention kernel of every model.

    q, k, v: (B, L, H, d); bias: (H, L, L) float32 or None; scale: default 1/sqrt(d) (T5 uses 1).
    Returns (B, L, H*d) in v's dtype.
    implementation:
      "xla"         any backend; float32 logits and softmax, probabilities cast to v's dtype for
                    the second matmul, as the references do; all (H, L, L) logits at once;
      "xla_blocked" the same computation in blocks of QUERY_BLOCK queries, for CPUs: a block's
                    logits stay in cache instead of streaming an (H, L, L) array through memory
                    (about 2.4x faster on a CPU at 1152 tokens). Each query row's softmax is
                    independent, so the result is the same;
      "cudnn"       fused flash attention on NVIDIA GPUs, bf16/fp16;
      "cpu"         fluxjax's CPU kernel (fluxjax/kernels), float32, no bias or mask; about 2x
                    XLA's speed on a CPU;
      "splash"      Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention),
                    no bias or mask: the TPU kernel that never holds an (L, L) array; on other
                    backends it runs in Pallas's interpret mode (slow: for tests). See
                    `splash_attention`;
      "auto"        decided when traced, by `auto_implementation` (see `resolve_attention`):
                    "cudnn" on NVIDIA GPUs where it applies, "splash" on a TPU, the CPU kernel
                    or "xla_blocked" on a CPU, else "xla". When the CPU kernel cannot be built
                    it warns once, saying why, and uses "xla_blocked".
    """
    b, l, h, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    # Pins the head split of tensor parallelism: each device attends with its own heads.
    q, k, v = (nn.with_logical_constraint(t, ("activation_batch", "activation_length", "activation_heads", None)) for t in (q, k, v))
    if implementation == "auto":
        implementation = auto_implementation(q.dtype, d, l, masked=bias is not None or causal)
    if implementation in ("xla", "xla_blocked"):
        if causal:
            causal_mask = jnp.tril(jnp.ones((l, l), dtype=bool))
            bias = jnp.where(causal_mask, 0.0, jnp.finfo(jnp.float32).min)[None] + (0.0 if bias is None else bias)
        query_block = QUERY_BLOCK if implementation == "xla_blocked" else None
        out = _xla_attention(q, k, v, bias, scale, query_block)
    elif implementation == "cudnn":
        bias = None if bias is None else bias[None].astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal, implementation="cudnn")
    elif implementation == "cpu":
        if bias is not None or causal:
            raise ValueError('attention implementation "cpu" has no bias or causal mask; use "xla_blocked" or "auto"')
        out = cpu_attention.attention(q, k, v, scale)
    elif implementation == "splash":
        if bias is not None or causal:
            raise ValueError('attention implementation "splash" has no bias or causal mask; use "xla" or "auto"')
        out = splash_attention(q, k, v, scale, interpret=splash_interpret())
    else:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose from {ATTENTION_IMPLEMENTATIONS}")
    return out.reshape(b, l, h * d)


def check_implementation(implementation: str, device) -> None:
    """Refuse, in one line, an attention implementation that cannot run on `device`'s platform
    (before any loading: "cudnn" on a CPU would fail deep in the first trace)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(f"attention {implementation!r}: choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    platform = device.platform
    if implementation == "cudnn" and not (platform == "gpu" and "nvidia" in device.device_kind.lower()):
        raise UsageError(f'attention "cudnn" runs on NVIDIA GPUs only, and this runs on {device.device_kind} '
                         f'({platform}): use "auto"')
    if implementation == "cpu" and platform != "cpu":
        raise UsageError(f'attention "cpu" is fluxjax\'s CPU kernel, and this runs on {device.device_kind} '
                         f'({platform}): use "auto"')


def resolve_attention(*, backend: str, device_kind: str, dtype: Dtype, head_dim: int, seq_len: int,
                      masked: bool, mesh_size: int = 1, cpu_kernel: bool = True,
                      compute_capability: str | None = None) -> str:
    """The implementation "auto" stands for, from the facts of where and what is attended.

    backend: the platform the program is compiled for ("cpu", "gpu", "tpu"; see `target_facts`:
    a TPU program compiled on a CPU host is "tpu"); device_kind: that platform's device kind
    ("NVIDIA H200", "TPU v5 lite", "cpu"); compute_capability: a CUDA device's ("9.0"), None when
    unknown; dtype of q/k/v; head_dim; seq_len: tokens attended (L); masked: a bias or a causal
    mask (T5's position bias, CLIP's causal mask); mesh_size: devices the SPMD partitioner still
    splits the attention over (1, or 0, without a mesh; inside a shard_map only the axes left
    automatic count); cpu_kernel: whether fluxjax's CPU kernel builds here (only read on a CPU).

    - CPU: "cpu" (fluxjax's kernel) for unmasked attention without a multi-device mesh (a custom
      call cannot be split by the SPMD partitioner) when it builds, else "xla_blocked".
    - NVIDIA GPU (compute capability 8.0 or newer when known): "cudnn" (fused flash attention)
      for unmasked bf16/fp16 attention with a head dim that is a multiple of 8 up to 128 (what
      cuDNN's flash kernel takes); else "xla". Masked attention stays on XLA: T5's float32
      position bias would be rounded to bf16 to enter cuDNN, and CLIP's 77 tokens gain nothing.
    - TPU: "splash" for unmasked attention, on one device or under a mesh (a Pallas call is not
      split by the SPMD partitioner, so under a mesh `splash_attention` runs per shard in a
      shard_map); "xla" for masked attention (T5, CLIP: splash here takes no bias).
    - anything else: "xla".
    seq_len does not change the choice today (splash pads to its blocks, see splash_tiling);
    it is an input so that a length rule lands here, in one place.
    """
    del seq_len
    dtype = jnp.dtype(dtype)
    if backend == "cpu":
        return "cpu" if not masked and mesh_size <= 1 and cpu_kernel else "xla_blocked"
    if backend in ("gpu", "cuda") and "nvidia" in device_kind.lower():
        recent = compute_capability is None or float(compute_capability) >= 8.0
        fits = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if recent and fits and not masked else "xla"
    if backend == "tpu":
        return "splash" if not masked else "xla"
    return "xla"


def auto_implementation(dtype: Dtype, head_dim: int, seq_len: int, masked: bool, mesh_size: int | None = None) -> str:
    """`resolve_attention` with the facts of where this program runs (`target_facts`), whether
    the CPU kernel builds, and mesh_size (None: the devices the abstract mesh of the trace this is
    called in still splits over, see `partitioned_size`).

    Decided at trace time, not when a model is built: the same model is traced with and
    without a mesh (one device, or a strategy's), and for this host or for a TPU target, and
    only the trace knows which.
    """
    facts = target_facts()
    mesh_size = max(1, partitioned_size() if mesh_size is None else mesh_size)
    # Asked only where it decides: building the kernel (or warning that it cannot) is not free.
    cpu_kernel = facts["backend"] == "cpu" and not masked and mesh_size == 1 and cpu_attention.suits()
    return resolve_attention(**facts, mesh_size=mesh_size, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                             masked=masked, cpu_kernel=cpu_kernel)


def partitioned_size() -> int:
    """Devices of the trace's abstract mesh over its automatic axes (0 without a mesh): the split
    the SPMD partitioner still makes. Inside a shard_map the manual axes are already per device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 0
    manual = set(getattr(mesh, "manual_axes", ()))
    return math.prod(size for name, size in mesh.shape.items() if name not in manual)


def target_facts() -> dict:
    """backend, device_kind and compute_capability of the platform the traced program is for.

    Under a mesh, its devices' platform: a program traced under a mesh of TPU devices from a
    topology description (`fluxjax plan --topology`) targets a TPU although this process runs
    on a CPU. Without a mesh, this process's default backend and its first device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if not mesh.empty else None
    if device is not None and getattr(device, "platform", None):
        here = device_facts()
        same = here["backend"] == device.platform
        return dict(backend=device.platform, device_kind=device.device_kind,
                    compute_capability=here["compute_capability"] if same else None)
    return device_facts()


def device_facts(device=None) -> dict:
    """backend, device_kind and compute_capability of `device` (default: this process's first),
    as `resolve_attention` takes them."""
    device = jax.devices()[0] if device is None else device
    return dict(backend=device.platform, device_kind=device.device_kind,
                compute_capability=getattr(device, "compute_capability", None))


def splash_interpret() -> bool:
    """Whether splash runs in Pallas's interpret mode: off a TPU target (a Mosaic kernel needs one)."""
    return target_facts()["backend"] != "tpu"


QUERY_BLOCK = 128  # queries per block of "xla_blocked"


def _xla_attention(q, k, v, bias, scale: float, query_block: int | None) -> jax.Array:
    """Plain-XLA attention: float32 logits and softmax; (B, L, H, d) -> (B, L, H, d) in v's dtype.

    query_block: None for all queries at once; else queries go through in blocks of this many
    (a sequence of at most two blocks goes through whole).
    """
    b, l, h, d = q.shape
    k_t, v_t = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # (B, H, d, L), (B, H, L, d)

    def block(q_block, bias_block):  # (B, H, c, d), (H, c, L) or None
        logits = jnp.matmul(q_block, k_t, preferred_element_type=jnp.float32) * scale
        if bias_block is not None:
            logits = logits + bias_block[None]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.matmul(probs, v_t, preferred_element_type=jnp.float32).astype(v.dtype)

    q_t = q.transpose(0, 2, 1, 3)  # (B, H, L, d)
    c = query_block
    if c is None or l <= 2 * c:
        return block(q_t, bias).transpose(0, 2, 1, 3)
    n = -(-l // c)
    pad = n * c - l  # padded query rows are computed and dropped
    q_blocks = jnp.pad(q_t, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, n, c, d).transpose(2, 0, 1, 3, 4)
    if bias is None:
        out = jax.lax.map(lambda qb: block(qb, None), q_blocks)
    else:
        bias = jnp.broadcast_to(bias, (h, l, l))
        bias_blocks = jnp.pad(bias, ((0, 0), (0, pad), (0, 0))).reshape(h, n, c, l).transpose(1, 0, 2, 3)
        out = jax.lax.map(lambda xs: block(*xs), (q_blocks, bias_blocks))
    return out.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, d)[:, :l]


SPLASH_UNIT = 128  # splash blocks are whole TPU lane tiles of tokens
# The largest splash block. Its float32 logits tile (block x block x 4 bytes), the q/k/v tiles and,
# with padding, the segment ids must fit the kernel's scoped VMEM: on a v5e (16 MiB of scope) the
# TPU compiler refused 2176 (30.3 MiB asked) and 1536 with segment ids (16.3 MiB;
# `fluxjax plan --topology v5e:2x4 --model schnell`), and takes 1024.
SPLASH_MAX_BLOCK = 1024
SPLASH_PAD = 1 / 16  # the padding splash_tiling accepts for a larger block, of the sequence's length


def splash_tiling(seq_len: int, max_block: int = SPLASH_MAX_BLOCK) -> tuple[int, int]:
    """(padded length, block) of splash's tiling for `seq_len` tokens: the largest block, a
    multiple of SPLASH_UNIT up to `max_block`, whose padding of the sequence to a whole number of
    blocks adds at most SPLASH_PAD of it (padded keys are masked by segment ids); else the block
    with the least padding. 4608 (dev at 1024) -> (4608, 768); 4352 (schnell) -> (4480, 896): 3%
    more tokens in blocks of 896 rather than 17 of 256; 16896 -> (17408, 1024).
    """
    if seq_len <= 0:
        raise ValueError(f"splash_tiling: seq_len must be positive, got {seq_len}")
    if max_block < SPLASH_UNIT:
        raise ValueError(f"splash_tiling: max_block must be at least {SPLASH_UNIT}, got {max_block}")
    blocks = range(max_block // SPLASH_UNIT * SPLASH_UNIT, 0, -SPLASH_UNIT)  # largest first
    padded = {block: -(-seq_len // block) * block for block in blocks}
    for block in blocks:
        if padded[block] - seq_len <= SPLASH_PAD * seq_len:
            return padded[block], block
    block = min(blocks, key=lambda b: (padded[b], -b))
    return padded[block], block


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool, residuals: bool = False):
    """One splash kernel (unmasked, every head) for this shape, keyed by static facts only.

    Built on a thread of its own, where no trace is active: the kernel holds its mask tables as
    arrays, and built inside a trace (jit, eval_shape, or the partial evaluation Flax's nn.scan
    runs, which `jax.ensure_compile_time_eval` does not reach) they would be that trace's
    tracers, which this cache would hand to the next trace (UnexpectedTracerError). JAX keeps
    its trace state per thread, so a fresh thread sees none.
    residuals: the kernel also returns each query's logsumexp (ring attention folds blocks with it).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def build():
        mask = splash.MultiHeadMask([splash.FullMask((seq_len, seq_len))] * heads)
        # the backward's blocks too (training differentiates through the kernel): the same tiles
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                      save_residuals=residuals)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def splash_attention(q, k, v, scale: float, *, interpret: bool = False, max_block: int = SPLASH_MAX_BLOCK) -> jax.Array:
    """Unmasked attention by Pallas splash attention: (B, L, H, d) -> (B, L, H, d) in v's dtype.

    q is scaled before the kernel (splash takes no scale), in float32 and then cast to q's dtype.
    L is padded to splash's tiling (`splash_tiling`) when it is not one; padded keys carry
    another segment id, so no real query attends to them, and padded query rows are dropped.
    interpret: run the kernel in Pallas's interpret
    mode (any backend; for tests on a CPU); else it lowers to a Mosaic TPU kernel.

    Under a mesh whose automatic axes split the work (fsdp's batch, tp's heads) the kernel runs
    per shard in a `shard_map`: the partitioner cannot split a Pallas call, and without the
    shard_map it would gather q, k, v onto every device. The shards are those the active
    logical rules give q, k, v (batch and heads; never the tokens: sequence-parallel strategies
    split them before this, models/sequence_parallel.py).
    """
    if partitioned_size() > 1:
        spec = _per_shard_spec(q.shape)
        local = functools.partial(_splash_local, scale=scale, interpret=interpret, max_block=max_block)
        mesh = jax.sharding.get_abstract_mesh()
        # check_vma off: the splash kernel declares its outputs without per-axis variance.
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return _splash_local(q, k, v, scale=scale, interpret=interpret, max_block=max_block)


def _per_shard_spec(shape) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of q, k, v (B, L, H, d) for splash's shard_map: batch and heads as the
    active rules give them where the mesh axes divide the dim, the tokens and head dim whole."""
    mesh = jax.sharding.get_abstract_mesh()
    names = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None))
    dims = []
    for axes_, size in zip(names, shape):
        if axes_ is not None and size % math.prod(mesh.shape[a] for a in ((axes_,) if isinstance(axes_, str) else axes_)):
            axes_ = None  # an uneven split: that dim stays whole on every device
        dims.append(axes_)
    return jax.sharding.PartitionSpec(*dims)


def _splash_local(q, k, v, *, scale: float, interpret: bool, max_block: int, kv_valid=None, residuals: bool = False):
    """Splash attention of one device's q (B, Lq, H, d) and k, v (B, Lk, H, d): Lq may exceed Lk
    (Ulysses keeps its padded queries and cuts the padded keys). Both are padded to splash's
    tiling, P tokens; padded keys, and keys where `kv_valid` (Lk,) bool is False, carry segment
    id 1, which no real query (segment 0) attends to; padded query rows are dropped.

    Returns the output (B, Lq, H, d) in v's dtype; with `residuals`, the output in float32 and each
    query's logsumexp of its scaled logits (B, Lq, H, 1) float32 (ring attention folds blocks
    with it, models/sequence_parallel.py).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, l, h, d = q.shape
    lk = k.shape[1]
    padded, block = splash_tiling(max(l, lk), max_block)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q = jnp.pad(q, ((0, 0), (0, padded - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    k, v = (jnp.pad(t, ((0, 0), (0, padded - lk), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for t in (k, v))
    kernel = _splash_kernel(h, padded, block, interpret, residuals)
    if padded == l == lk and kv_valid is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        valid = np.arange(padded) < lk if kv_valid is None else jnp.pad(kv_valid, (0, padded - lk))
        ids = SegmentIds(jnp.asarray(np.arange(padded) >= l, jnp.int32), jnp.where(valid, 0, 1).astype(jnp.int32))
        out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=ids))(q, k, v)
    if not residuals:
        return out.transpose(0, 2, 1, 3)[:, :l].astype(v.dtype)
    out, (lse,) = out  # (B, H, P, d), (B, H, P)
    return out.transpose(0, 2, 1, 3)[:, :l].astype(jnp.float32), lse.transpose(0, 2, 1)[:, :l, :, None]


def splash_block_attention(q, k, v, kv_valid, *, scale: float, interpret: bool,
                           max_block: int = SPLASH_MAX_BLOCK) -> tuple[jax.Array, jax.Array]:
    """One block of ring attention by splash: q (B, c, H, d) against k, v (B, c, H, d) of which
    `kv_valid` (c,) bool are real keys. Returns the output normalised over this block's valid keys
    (B, c, H, d) float32 and each query's logsumexp (B, c, H, 1) float32 (see `_splash_local`)."""
    return _splash_local(q, k, v, scale=scale, interpret=interpret, max_block=max_block, kv_valid=kv_valid,
                         residuals=True)


def attention(q, k, v, cos, sin, *, implementation: str = "auto") -> jax.Array:
    """FLUX joint attention: RoPE on q and k, then full (non-causal, unmasked) attention.

    q, k, v: (B, L, H, d); cos, sin: (B, L, d/2). Returns (B, L, H*d) in v's dtype.
    Under a sequence-parallel strategy (an `activation_seq` rule) the tokens stay split across
    devices: Ulysses or ring attention, models/sequence_parallel.py.
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Tokens over the sequence axis, if the strategy has one (else as dot_product_attention pins them).
    q, k, v = (nn.with_logical_constraint(t, sequence_parallel.QKV_AXES) for t in (q, k, v))
    if sequence_parallel.active_method():
        local = lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation)  # noqa: E731
        # The ring folds key blocks itself: with splash, each block through the kernel (per device).
        b, l, h, d = q.shape
        per_device = implementation if implementation != "auto" else auto_implementation(q.dtype, d, l, False, 1)
        block = None
        if per_device == "splash":
            block = functools.partial(splash_block_attention, scale=1 / math.sqrt(d), interpret=splash_interpret())
        return sequence_parallel.attention(q, k, v, local, block_attention=block)
    return dot_product_attention(q, k, v, implementation=implementation)
