"""Sequence (context) parallel attention: the joint [text ; image] sequence split over a mesh axis.

A strategy turns it on through its rules alone (fluxjax/configs/sharding/sp_*.toml), so that
`jit_with_rules` keys compiled programs on it like any other layout:

    activation_seq    = "seq"   # the mesh axis the tokens are split over inside attention
    activation_length = "seq"   # ... and outside it (residual stream, MLPs, modulation)
    activation_heads  = "seq"   # only for Ulysses: inside attention the heads are split instead

Two methods, chosen by whether `activation_heads` names the same mesh axis as `activation_seq`:

  Ulysses (DeepSpeed-Ulysses, arXiv:2309.14509): each device holds L/n tokens of every head; an
    all-to-all turns that into all L tokens of H/n heads, attention runs locally, and a second
    all-to-all turns the output back. n must divide the heads (24 in FLUX.1: 2, 3, 4, 6, 8, ...).
    Per device and attention call it sends and receives 4 tensors (q, k, v, out) of
    (n-1)/n * B * L/n * H * d elements.
  ring (Ring Attention, arXiv:2310.01889): queries stay where they are; the n blocks of keys
    and values travel around the ring by `ppermute`, one hop per step, and each device folds
    every block into its output with an online softmax (running max m, sum l, accumulator), so
    no device ever holds more than one block of keys. Any n works. Per device and attention call
    it sends and receives (n-1) blocks of k and v: 2 (n-1) * B * L/n * H * d elements.

RoPE is applied before the split (q and k arrive rotated), so the tables follow the tokens.
When n does not divide L the sequence is padded at its end to a multiple of n; padded keys get
no weight (ring: masked in the softmax; Ulysses: cut off once every device holds the whole
sequence), padded queries are computed and dropped.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxjax.errors import UsageError
from fluxjax.models import axes

METHODS = ("ulysses", "ring")
QKV_AXES = (axes.ACTIVATION_BATCH, axes.ACTIVATION_SEQ, axes.ACTIVATION_HEADS, None)  # of q, k, v (B, L, H, d)
# A logit no real key reaches: masked keys get exp(MASKED - max) == 0 once any real key is seen,
# and stays finite, so a block of padding alone gives no inf - inf.
MASKED = -1e30


def _rule(logical: str) -> tuple[str, ...]:
    """The mesh axes the active rules give `logical` first; () when none."""
    for name, target in nn.get_logical_axis_rules():
        if name == logical:
            return () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return ()


def active_method() -> tuple[str, tuple[str, ...]] | None:
    """(method, sequence mesh axes) of the active strategy, or None when it splits no sequence.

    Read at trace time from the rules `Strategy.activate` (or `jit_with_rules`) put in force.
    """
    seq = _rule(axes.ACTIVATION_SEQ)
    return (method_of(seq, _rule(axes.ACTIVATION_HEADS)), seq) if seq else None


def method_of(seq: tuple[str, ...], heads: tuple[str, ...]) -> str | None:
    """"ulysses" when the heads are split over the sequence's own mesh axes inside attention,
    "ring" when the tokens are split but not so, None when they are not split (seq == ())."""
    if not seq:
        return None
    return "ulysses" if heads == seq else "ring"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, local_attention: Callable,
              block_attention: Callable | None = None) -> jax.Array:
    """Attention of q, k, v (B, L, H, d), RoPE already applied, split over the active strategy's
    sequence axis (see the module docstring). Returns (B, L, H*d) in v's dtype.

    local_attention(q, k, v) -> (B, Lq, H*d): unmasked attention of a device's whole problem,
    used by Ulysses (attention.dot_product_attention with the model's implementation). It is
    called with no logical rules in force: inside `shard_map` arrays are per device.
    block_attention(q, k, v, kv_valid) -> (out, logsumexp): one ring block by a kernel (splash on
    a TPU, splash.splash_block_attention), or None for the ring's own XLA fold (see `_ring`).
    """
    method, seq = active_method()
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise UsageError(f"sequence parallel attention ({method}) needs a mesh: run under Strategy.activate")
    n = math.prod(mesh.shape[a] for a in seq)
    b, l, h, d = q.shape
    if method == "ulysses" and h % n:
        raise UsageError(f"Ulysses attention splits the {h} heads over the sequence axis {'x'.join(seq)}={n}: "
                         f"choose a degree that divides {h}, or the ring strategy")
    padded = -(-l // n) * n
    if padded != l:
        q, k, v = (jnp.pad(t, ((0, 0), (0, padded - l), (0, 0), (0, 0))) for t in (q, k, v))
    # The layout attention.attention pins q, k, v to: batch as outside attention (fsdp/dp), tokens
    # over the sequence axis, heads over a tensor axis if one (Ulysses' heads name the sequence
    # axis, which the tokens hold already, so they stay whole here).
    spec = nn.logical_to_mesh_axes(QKV_AXES)
    axis = seq if len(seq) > 1 else seq[0]
    if method == "ulysses":
        body = functools.partial(_ulysses, axis=axis, length=l, local_attention=local_attention)
    elif block_attention is None:
        body = functools.partial(_ring, axis=axis, n=n, length=l, scale=1 / math.sqrt(d))
    else:
        body = functools.partial(_ring_by_blocks, axis=axis, n=n, length=l, scale=1 / math.sqrt(d),
                                 block_attention=block_attention)
    # check_vma off: the ring's running max/sum/accumulator start as constants but become
    # per-device values in the loop; every output is per device anyway (out_specs = in_specs).
    out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return out[:, :l].reshape(b, l, h * d)


def _ulysses(q, k, v, *, axis, length: int, local_attention: Callable):
    """Per device: (B, Lp/n, H, d) token blocks -> all-to-all -> (B, Lp, H/n, d) -> attention
    over the `length` real keys -> all-to-all back -> (B, Lp/n, H, d)."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    # Blocks are concatenated in device order, so the padding is the sequence's tail.
    k, v = k[:, :length], v[:, :length]
    with nn.logical_axis_rules(()):
        out = local_attention(q, k, v)  # (B, Lp, H/n * d)
    out = out.reshape(q.shape)
    return jax.lax.all_to_all(out, axis_name=axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(q, k, v, *, axis, n: int, length: int, scale: float):
    """Per device: queries (B, c, H, d) against the n key/value blocks (B, c, H, d) as they pass
    around the ring, c = Lp/n; an online softmax in float32. Returns (B, c, H, d) in v's dtype.

    Step s holds the block that started on device (i - s) mod n; its keys at global positions
    >= `length` are padding and masked.
    """
    b, c, h, d = q.shape
    me = jax.lax.axis_index(axis)
    shift = [(i, (i + 1) % n) for i in range(n)]
    q = q.transpose(0, 2, 1, 3)  # (B, H, c, d)

    def fold(step, carry):
        k_blk, v_blk, m, total, acc = carry
        logits = jnp.einsum("bhqd,bkhd->bhqk", q, k_blk, preferred_element_type=jnp.float32) * scale
        if n * c != length:
            origin = (me - step) % n
            valid = origin * c + jnp.arange(c) < length  # (c,) of the keys
            logits = jnp.where(valid, logits, MASKED)
        m_new = jnp.maximum(m, logits.max(-1, keepdims=True))
        p = jnp.exp(logits - m_new)
        correction = jnp.exp(m - m_new)
        total = total * correction + p.sum(-1, keepdims=True)
        acc = acc * correction + jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_blk,
                                            preferred_element_type=jnp.float32)
        return k_blk, v_blk, m_new, total, acc

    def hop(step, carry):
        k_blk, v_blk, m, total, acc = fold(step, carry)
        k_blk, v_blk = (jax.lax.ppermute(t, axis, shift) for t in (k_blk, v_blk))
        return k_blk, v_blk, m, total, acc

    init = (k, v, jnp.full((b, h, c, 1), MASKED, jnp.float32), jnp.zeros((b, h, c, 1), jnp.float32),
            jnp.zeros((b, h, c, d), jnp.float32))
    carry = jax.lax.fori_loop(0, n - 1, hop, init)
    _, _, _, total, acc = fold(n - 1, carry)  # the last block needs no hop onward
    return (acc / total).astype(v.dtype).transpose(0, 2, 1, 3)


def _ring_by_blocks(q, k, v, *, axis, n: int, length: int, scale: float, block_attention: Callable):
    """`_ring`'s result with each block's attention by `block_attention` (a flash kernel that
    gives the block's normalised output and each query's logsumexp), folded by logsumexp:
    lse' = logaddexp(lse, lse_b), out' = out e^(lse - lse') + out_b e^(lse_b - lse').

    Differentiated through `_ring` (a custom VJP): the kernel's residual output has no gradient
    rule of its own, and `_ring`'s backward is the same function's exactly. That backward redoes
    the ring's forward in XLA ops, with each hop's (c, c) logits: training under sp_ring keeps the
    XLA ring's memory (fluxjax plan --train does not plan sequence-parallel strategies).
    """

    @jax.custom_vjp
    def ring(q, k, v):
        b, c, h, d = q.shape
        me = jax.lax.axis_index(axis)
        shift = [(i, (i + 1) % n) for i in range(n)]

        def fold(step, carry):
            k_blk, v_blk, lse, out = carry
            origin = (me - step) % n
            out_b, lse_b = block_attention(q, k_blk, v_blk, origin * c + jnp.arange(c) < length)
            new = jnp.logaddexp(lse, lse_b)
            out = out * jnp.exp(lse - new) + out_b * jnp.exp(lse_b - new)
            return k_blk, v_blk, new, out

        def hop(step, carry):
            k_blk, v_blk, lse, out = fold(step, carry)
            k_blk, v_blk = (jax.lax.ppermute(t, axis, shift) for t in (k_blk, v_blk))
            return k_blk, v_blk, lse, out

        init = (k, v, jnp.full((b, c, h, 1), MASKED, jnp.float32), jnp.zeros((b, c, h, d), jnp.float32))
        _, _, _, out = fold(n - 1, jax.lax.fori_loop(0, n - 1, hop, init))
        return out.astype(v.dtype)

    def forward(q, k, v):
        return ring(q, k, v), (q, k, v)

    def backward(saved, grad):
        _, pullback = jax.vjp(functools.partial(_ring, axis=axis, n=n, length=length, scale=scale), *saved)
        return pullback(grad)

    ring.defvjp(forward, backward)
    return ring(q, k, v)
