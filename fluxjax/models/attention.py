"""Attention for every fluxjax model: the implementations ("xla", "xla_blocked", "cudnn", "cpu",
"splash"), the choice "auto" makes from where the program runs, and FLUX's joint attention with
RoPE (docs/model-reference.md, "The transformer").

Numerics follow the reference: float32 logits and softmax; probabilities in v's dtype.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.errors import UsageError
from fluxjax.kernels import cpu_attention
from fluxjax.models import sequence_parallel
from fluxjax.models.layers import Dtype, apply_rope
from fluxjax.models.splash import splash_attention, splash_block_attention
from fluxjax.models.target import partitioned_size, target_facts

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "xla_blocked", "cudnn", "cpu", "splash")


def dot_product_attention(q, k, v, *, bias=None, causal: bool = False, scale: float | None = None,
                          implementation: str = "auto") -> jax.Array:
    """softmax(scale * q k^T + bias [+ causal mask]) v: the one attention kernel of every model.

    q, k, v: (B, L, H, d), or k, v (B, L_k, H, d) with more keys than queries (no bias or causal mask
    then); bias: (H, L, L) float32 or None; scale: default 1/sqrt(d) (T5 uses 1).
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
    square = k.shape[1] == l  # else more keys than queries (cached reference tokens, `attention`'s extra_kv)
    scale = 1 / math.sqrt(d) if scale is None else scale
    # Pins the head split of tensor parallelism: each device attends with its own heads.
    q, k, v = (nn.with_logical_constraint(t, ("activation_batch", "activation_length", "activation_heads", None)) for t in (q, k, v))
    if implementation == "auto":
        implementation = auto_implementation(q.dtype, d, l, masked=bias is not None or causal, square=square)
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
        if bias is not None or causal or not square:
            raise ValueError('attention implementation "cpu" has no bias or causal mask and takes as many keys as '
                             'queries; use "xla_blocked" or "auto"')
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


def auto_implementation(dtype: Dtype, head_dim: int, seq_len: int, masked: bool, mesh_size: int | None = None,
                        square: bool = True) -> str:
    """`resolve_attention` with the facts of where this program runs (`target_facts`), whether
    the CPU kernel builds, and mesh_size (None: the devices the abstract mesh of the trace this is
    called in still splits over, see `partitioned_size`); square: as many keys as queries (the
    CPU kernel takes only that).

    Decided at trace time, not when a model is built: the same model is traced with and
    without a mesh (one device, or a strategy's), and for this host or for a TPU target, and
    only the trace knows which.
    """
    facts = target_facts()
    mesh_size = max(1, partitioned_size() if mesh_size is None else mesh_size)
    # Asked only where it decides: building the kernel (or warning that it cannot) is not free.
    cpu_kernel = facts["backend"] == "cpu" and not masked and square and mesh_size == 1 and cpu_attention.suits()
    return resolve_attention(**facts, mesh_size=mesh_size, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                             masked=masked, cpu_kernel=cpu_kernel)


def splash_interpret() -> bool:
    """Whether splash runs in Pallas's interpret mode: off a TPU target (a Mosaic kernel needs one)."""
    return target_facts()["backend"] != "tpu"


QUERY_BLOCK = 128  # queries per block of "xla_blocked"


def blocked_attention(q, k, v, scale: float) -> jax.Array:
    """Unmasked attention in blocks of QUERY_BLOCK queries, never holding all (L, L) logits:
    (B, L, H, d) -> (B, L, H, d) in v's dtype, float32 logits and softmax (the VAE's mid-block
    attention over every latent position, where the whole logits outgrow a chip at 2048 pixels)."""
    return _xla_attention(q, k, v, None, scale, QUERY_BLOCK)


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

def attention(q, k, v, cos, sin, *, implementation: str = "auto", extra_kv=None) -> jax.Array:
    """FLUX joint attention: RoPE on q and k, then full (non-causal, unmasked) attention.

    q, k, v: (B, L, H, d); cos, sin: (B, L, d/2). Returns (B, L, H*d) in v's dtype.
    extra_kv: None, or (k, v) (B, L_x, H, d) of more tokens every query attends to as well, keys
    already rotated (cached reference tokens, see models.flux.Flux's ref_kv).
    Under a sequence-parallel strategy (an `activation_seq` rule) the tokens stay split across
    devices: Ulysses or ring attention, models/sequence_parallel.py.
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if extra_kv is not None:
        if sequence_parallel.active_method():
            raise ValueError("cached reference keys/values (extra_kv) do not run under a sequence-parallel "
                             "strategy yet")
        k, v = (jnp.concatenate([t, x.astype(t.dtype)], axis=1) for t, x in zip((k, v), extra_kv))
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
