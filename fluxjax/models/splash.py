"""Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for FLUX: its
tiling of a sequence into blocks, the kernel per shape, the per-shard call under a mesh, and the
one-block form ring attention folds (models/sequence_parallel.py)."""

from __future__ import annotations

import concurrent.futures
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.models.target import partitioned_size


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


def splash_attention(q, k, v, scale: float, *, interpret: bool = False, max_block: int | None = None) -> jax.Array:
    """Unmasked attention by Pallas splash attention: (B, L, H, d) -> (B, L, H, d) in v's dtype.

    q is scaled before the kernel (splash takes no scale), in float32 and then cast to q's dtype.
    L is padded to splash's tiling (`splash_tiling`) when it is not one; padded keys carry
    another segment id, so no real query attends to them, and padded query rows are dropped.
    max_block: the largest block (None: SPLASH_MAX_BLOCK). interpret: run the kernel in Pallas's interpret
    mode (any backend; for tests on a CPU); else it lowers to a Mosaic TPU kernel.

    Under a mesh whose automatic axes split the work (fsdp's batch, tp's heads) the kernel runs
    per shard in a `shard_map`: the partitioner cannot split a Pallas call, and without the
    shard_map it would gather q, k, v onto every device. The shards are those the active
    logical rules give q, k, v (batch and heads; never the tokens: sequence-parallel strategies
    split them before this, models/sequence_parallel.py).
    """
    # SPLASH_MAX_BLOCK read at the call, not bound at import: a test lowers it to run several blocks.
    max_block = SPLASH_MAX_BLOCK if max_block is None else max_block
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
