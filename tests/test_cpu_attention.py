"""fluxjax's CPU attention kernel (fluxjax/kernels): accuracy against float64 and PyTorch's
float32 SDPA, when "auto" takes it, and what happens when it cannot be built."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fluxjax.kernels import build, cpu_attention
from fluxjax.models import attention


def _float64_attention(q, k, v):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhlm,bmhd->blhd", probs / probs.sum(-1, keepdims=True), v)


def _rel(out, ref):
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


# Lengths off the kernel's 32-column strips and 8-row tiles, head dims off its 16-float vectors
# (24: scalar columns), one query, batches of two, and FLUX's own 64-dim heads.
SHAPES = [(2, 37, 3, 32), (1, 100, 2, 16), (1, 300, 2, 128), (1, 50, 2, 24), (1, 1, 1, 16), (2, 257, 4, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_as_accurate_as_pytorch_sdpa(shape):
    rng = np.random.default_rng(0)
    q, k, v = ((3 * rng.standard_normal(shape)).astype(np.float32) for _ in range(3))  # logits up to ~100
    ref = _float64_attention(q, k, v)
    ours = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, 1 / math.sqrt(shape[-1])))(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)))
    theirs = sdpa.transpose(1, 2).numpy()
    assert ours.shape == shape and ours.dtype == jnp.float32
    # Measured: within 1.16x of SDPA's own float32 error on every shape here (1e-6 to 6e-6).
    assert _rel(ours, ref) <= max(1.5 * _rel(theirs, ref), 1e-7)


def test_kernel_matches_xla_attention_in_bf16_and_under_vmap():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 40, 2, 32)), jnp.float32) for _ in range(3))
    xla = jax.vmap(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla"))(q, k, v)
    cpu = jax.vmap(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu"))(q, k, v)
    assert float(jnp.abs(cpu - xla).max()) < 1e-5
    bf16 = attention.dot_product_attention(*(x[0].astype(jnp.bfloat16) for x in (q, k, v)), implementation="cpu")
    assert bf16.dtype == jnp.bfloat16  # computed in float32, returned in v's dtype
    assert float(jnp.abs(bf16.astype(jnp.float32) - xla[0]).max()) < 2e-2


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_auto_takes_the_kernel_only_where_it_applies():
    q = jnp.ones((1, 8, 2, 16))
    auto = lambda **kw: lambda q: attention.dot_product_attention(q, q, q, **kw)  # noqa: E731
    assert cpu_attention.TARGET in _lowered(auto(), q)
    assert cpu_attention.TARGET not in _lowered(auto(implementation="xla"), q)
    assert cpu_attention.TARGET not in _lowered(auto(causal=True), q)  # CLIP
    assert cpu_attention.TARGET not in _lowered(auto(bias=jnp.zeros((2, 8, 8))), q)  # T5
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert cpu_attention.TARGET not in _lowered(auto(), q)  # the partitioner could not split it
    with pytest.raises(ValueError, match="no bias or causal mask"):
        attention.dot_product_attention(q, q, q, causal=True, implementation="cpu")


def test_masked_attention_on_a_cpu_is_xla_in_query_blocks():
    """"auto" with a bias or causal mask traces "xla_blocked" here, a loop over query blocks;
    "xla" attends with all logits at once; both give the same result."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 300, 2, 16)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((2, 300, 300)), jnp.float32)
    attend = lambda implementation: lambda q: attention.dot_product_attention(  # noqa: E731
        q, k, v, bias=bias, implementation=implementation)
    assert _lowered(attend("auto"), q) == _lowered(attend("xla_blocked"), q)
    assert "stablehlo.while" in _lowered(attend("xla_blocked"), q)
    assert "stablehlo.while" not in _lowered(attend("xla"), q)
    assert _rel(attend("xla_blocked")(q), np.asarray(attend("xla")(q), np.float64)) <= 1e-6


def test_a_failed_build_warns_and_falls_back_to_xla(tmp_path):
    """With a compiler that fails: "auto" warns once, naming the reason, and gives XLA's
    result; "cpu" raises; the cache folder holds no partial library."""
    script = textwrap.dedent("""
        import warnings
        import jax.numpy as jnp
        from fluxjax.kernels import build, cpu_attention
        from fluxjax.models import attention
        q = jnp.ones((1, 8, 2, 16))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = attention.dot_product_attention(q, q, q)
            attention.dot_product_attention(q, q, q)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "failed on" in messages[0], messages
        assert jnp.allclose(out, attention.dot_product_attention(q, q, q, implementation="xla"))
        try:
            attention.dot_product_attention(q, q, q, implementation="cpu")
        except build.KernelUnavailable as error:
            print("raised:", str(error).splitlines()[0])
    """)
    cache = tmp_path / "kernels"
    env = {**os.environ, "CXX": "false", "FLUXJAX_KERNEL_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "raised: " in run.stdout and "failed on" in run.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    first = build.build("cpu_attention")
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert build.build("cpu_attention") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
