"""Fast and exact by default (issue 21): "auto" attention per backend (GPU and TPU simulated by the
resolution function's inputs), splash attention in Pallas interpret mode against XLA attention,
and float32 models at HIGHEST matmul precision in the lowered HLO."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.models import attention, autoencoder, clip, flux, layers, splash, t5, target

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def resolve(backend, device_kind, dtype=BF16, head_dim=128, seq_len=4608, masked=False, mesh_size=1, **kw):
    return attention.resolve_attention(backend=backend, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
                                    seq_len=seq_len, masked=masked, mesh_size=mesh_size, **kw)


def test_auto_on_an_nvidia_gpu_is_cudnn_where_it_applies_else_xla():
    h200 = dict(backend="gpu", device_kind="NVIDIA H200", compute_capability="9.0")
    assert resolve(**h200) == "cudnn"
    assert resolve(**h200, dtype=F16) == "cudnn"
    assert resolve(**h200, mesh_size=8) == "cudnn"  # cuDNN's call carries its own partitioning rules
    assert resolve(**h200, dtype=F32) == "xla"  # cuDNN's flash kernel has no float32
    assert resolve(**h200, head_dim=256) == "xla"
    assert resolve(**h200, head_dim=100) == "xla"
    assert resolve(**h200, masked=True, seq_len=512) == "xla"  # T5's bias, CLIP's causal mask
    assert resolve(backend="gpu", device_kind="NVIDIA GeForce GTX 1080", compute_capability="6.1") == "xla"
    assert resolve(backend="gpu", device_kind="AMD Instinct MI300X") == "xla"


def test_auto_on_a_tpu_is_splash_for_unmasked_attention_with_or_without_a_mesh():
    v5e = dict(backend="tpu", device_kind="TPU v5 lite")
    assert resolve(**v5e) == "splash"
    assert resolve(**v5e, dtype=F32, seq_len=4352) == "splash"
    assert resolve(**v5e, masked=True, seq_len=512) == "xla"
    assert resolve(**v5e, mesh_size=4) == "splash"  # per shard, in a shard_map (splash.splash_attention)


def test_auto_on_a_cpu_is_the_kernel_unmasked_on_one_device_else_blocked_xla():
    assert resolve("cpu", "cpu", dtype=F32) == "cpu"
    assert resolve("cpu", "cpu", dtype=F32, masked=True) == "xla_blocked"
    assert resolve("cpu", "cpu", dtype=F32, mesh_size=8) == "xla_blocked"
    assert resolve("cpu", "cpu", dtype=F32, cpu_kernel=False) == "xla_blocked"
    assert resolve("other", "something") == "xla"


def test_auto_resolution_here_uses_this_processes_facts():
    facts = target.device_facts()
    assert facts["backend"] == jax.default_backend()
    want = attention.resolve_attention(**facts, dtype=F32, head_dim=128, seq_len=256, masked=True)
    assert attention.auto_implementation(F32, 128, 256, masked=True) == want


@pytest.mark.parametrize("seq_len, padded, block", [(4608, 4608, 768), (4352, 4480, 896), (1536, 1536, 768),
                                                    (16896, 17408, 1024), (128, 128, 128), (200, 256, 256),
                                                    (2304, 2304, 768), (80, 128, 128), (1024, 1024, 1024)])
def test_splash_tiles_flux_sequence_lengths_in_large_blocks(seq_len, padded, block):
    # schnell at 1024 (4096 + 256 tokens) is padded 3% to blocks of 896 rather than cut in 17 of
    # 256; the 2176-token blocks that divide it overflow a v5e's scoped VMEM (the TPU compiler's
    # CompileTimeScopedVmemOom, 30.3 of 16 MiB), and so do 1536-token blocks with segment ids.
    assert splash.splash_tiling(seq_len) == (padded, block)
    assert padded % block == 0 and block % splash.SPLASH_UNIT == 0 and block <= splash.SPLASH_MAX_BLOCK


def test_splash_tiling_takes_the_largest_block_within_the_padding_allowance():
    for seq_len in range(1, 40_000, 37):
        padded, block = splash.splash_tiling(seq_len)
        assert padded >= seq_len and padded % block == 0 and block % 128 == 0 and block <= splash.SPLASH_MAX_BLOCK
        larger = [b for b in range(block + 128, splash.SPLASH_MAX_BLOCK + 1, 128)
                  if -(-seq_len // b) * b - seq_len <= seq_len * splash.SPLASH_PAD]
        assert not larger, (seq_len, block, larger)
        if padded - seq_len > seq_len * splash.SPLASH_PAD:  # none within the allowance: the least padding
            assert padded == min(-(-seq_len // b) * b for b in range(128, splash.SPLASH_MAX_BLOCK + 1, 128))
    with pytest.raises(ValueError, match="positive"):
        splash.splash_tiling(0)


@pytest.mark.parametrize("seq_len, max_block", [(512, 256), (200, splash.SPLASH_MAX_BLOCK)])
def test_splash_attention_in_interpret_mode_equals_xla_attention(seq_len, max_block, monkeypatch):
    # Head size 128 as FLUX's; 512 tokens in two blocks of 256, and 200 tokens padded to 256 (the
    # padded keys masked out by segment ids). Interpret mode runs the kernel's own block loop.
    monkeypatch.setattr(splash, "SPLASH_MAX_BLOCK", max_block)
    rng = np.random.default_rng(seq_len)
    q, k, v = (jnp.asarray(rng.standard_normal((1, seq_len, 2, 128)), F32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        want = attention.dot_product_attention(q, k, v, implementation="xla")
        got = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="splash"))(q, k, v)
    assert got.shape == want.shape == (1, seq_len, 256) and got.dtype == F32
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert err < 1e-5, err


def test_splash_refuses_a_mask():
    q = jnp.zeros((1, 128, 1, 128))
    with pytest.raises(ValueError, match="splash"):
        attention.dot_product_attention(q, q, q, causal=True, implementation="splash")


def test_precision_follows_dtype_unless_set():
    assert layers.matmul_precision(F32) == "highest"
    assert layers.matmul_precision(BF16) is None
    assert layers.matmul_precision(F32, "default") == "default"
    assert layers.matmul_precision(BF16, "highest") == "highest"


def _lowered(model, *args, method=None) -> str:
    params = jax.eval_shape(model.init, jax.random.key(0), *args)
    return jax.jit(lambda p, *a: model.apply(p, *a, method=method)).lower(params, *args).as_text()


def _models(dtype, **kw):
    """Each model at `dtype` with one example input (shapes only)."""
    f = FluxConfig.preset("tiny")
    arg = lambda *s: jax.ShapeDtypeStruct(s, F32)  # noqa: E731
    flux_args = (arg(1, 4, f.in_channels), arg(1, 4, 3), arg(1, 3, f.context_in_dim), arg(1, 3, 3), arg(1),
                 arg(1, f.vec_in_dim), arg(1))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    vae = AutoEncoderConfig.preset("tiny")
    return {
        "flux": (flux.Flux(f, dtype=dtype, param_dtype=dtype, **kw), flux_args),
        "t5": (t5.T5Encoder(T5Config.preset("tiny"), dtype=dtype, param_dtype=dtype, **kw), (ids,)),
        "clip": (clip.CLIPTextEncoder(CLIPConfig.preset("tiny"), dtype=dtype, param_dtype=dtype, **kw), (ids,)),
        "vae": (autoencoder.AutoEncoder(vae, dtype=dtype, param_dtype=dtype, **kw),
                (jax.ShapeDtypeStruct((1, 16, 16, vae.in_channels), F32),)),
    }


@pytest.mark.parametrize("name", ["flux", "t5", "clip", "vae"])
def test_float32_models_lower_at_highest_precision_and_bf16_ones_do_not(name):
    model, args = _models(F32)[name]
    text = _lowered(model, *args)
    dots = [line for line in text.splitlines() if "dot_general" in line or "convolution" in line]
    assert dots and all("HIGHEST" in line for line in dots), [d for d in dots if "HIGHEST" not in d][:3]
    model, args = _models(BF16)[name]
    text = _lowered(model, *args)
    assert "dot_general" in text and "HIGHEST" not in text
    model, args = _models(F32, precision="default")[name]
    assert "HIGHEST" not in _lowered(model, *args)


def test_vae_encode_and_decode_methods_lower_at_highest_precision_in_float32():
    model, (x,) = _models(F32)["vae"]
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    z = jax.ShapeDtypeStruct((1, 2, 2, model.config.z_channels), F32)
    for method, arg in (("encode", x), ("decode", z)):
        text = jax.jit(lambda p, a: model.apply(p, a, method=method)).lower(params, arg).as_text()  # noqa: B023
        assert "convolution" in text and "HIGHEST" in text


def test_the_pipeline_says_which_attention_its_transformer_runs():
    from fluxjax.pipeline.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained("tiny", dtype="float32")
    c = pipe.transformer.model.config
    want = attention.auto_implementation(F32, c.hidden_size // c.num_heads, 256 // 16 * (256 // 16) + 64, masked=False,
                                      mesh_size=1)
    assert pipe.attention_implementation == want
    if jax.default_backend() == "cpu":
        assert want in ("cpu", "xla_blocked")
    assert FluxPipeline.from_pretrained("tiny", attention_impl="xla").attention_implementation == "xla"


def test_gpu_xla_flags_are_set_only_on_cuda_and_never_over_the_users():
    from fluxjax import runtime

    flags = " ".join(runtime.GPU_FLAGS)
    assert runtime.gpu_default_flags({}, cuda_plugin=True) == flags
    assert runtime.gpu_default_flags({"JAX_PLATFORMS": "cuda,cpu"}, cuda_plugin=True) == flags
    assert runtime.gpu_default_flags({}, cuda_plugin=False) is None
    assert runtime.gpu_default_flags({"JAX_PLATFORMS": "cpu"}, cuda_plugin=True) is None
    assert runtime.gpu_default_flags({"XLA_FLAGS": ""}, cuda_plugin=True) is None
    assert runtime.gpu_default_flags({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, cuda_plugin=True) is None
    environ = {"XLA_FLAGS": "--mine"}
    runtime.apply_gpu_defaults(environ)
    assert environ == {"XLA_FLAGS": "--mine"}


def test_the_installed_xla_knows_the_gpu_flags():
    # XLA aborts a process whose XLA_FLAGS holds a flag it does not know: a renamed flag must fail here.
    import os
    import subprocess
    import sys

    from fluxjax import runtime

    env = {**os.environ, "XLA_FLAGS": " ".join(runtime.GPU_FLAGS), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "2.0" in run.stdout, run.stderr[-500:]


@pytest.mark.slow
def test_splash_runs_in_the_scanned_transformer_after_an_abstract_init_and_equals_xla():
    # The TPU default crashed here (issue 30): the splash kernel, cached by shape, was first
    # built inside the eval_shape of the parameter shapes under nn.scan and kept that trace's
    # mask arrays; the next trace (this jit) met them as leaked tracers. 64 image + 16 text
    # tokens are padded to 128 (segment ids mask the padding).
    from fluxjax.loading import registry

    cfg = FluxConfig.preset("tiny")
    models = {impl: flux.Flux(cfg, dtype=F32, param_dtype=F32, attention_impl=impl) for impl in ("splash", "xla")}
    registry.abstract_params("transformer", models["splash"])  # builds the kernel inside a trace
    rng = np.random.default_rng(0)
    b, l_img, l_txt = 2, 64, 16
    img_ids = np.zeros((b, l_img, 3), np.float32)
    img_ids[..., 1], img_ids[..., 2] = np.divmod(np.arange(l_img), 8)
    inputs = (jnp.asarray(rng.standard_normal((b, l_img, cfg.in_channels)), F32), jnp.asarray(img_ids),
              jnp.asarray(rng.standard_normal((b, l_txt, cfg.context_in_dim)), F32), jnp.zeros((b, l_txt, 3), F32),
              jnp.asarray([0.3, 0.8], F32), jnp.asarray(rng.standard_normal((b, cfg.vec_in_dim)), F32),
              jnp.asarray([3.5, 3.5], F32))
    params = models["xla"].init(jax.random.key(0), *inputs)
    with jax.default_matmul_precision("highest"):
        got, want = (jax.jit(models[impl].apply)(params, *inputs) for impl in ("splash", "xla"))
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert got.shape == (b, l_img, cfg.in_channels) and err < 1e-5, err


def test_an_attention_the_platform_cannot_run_is_refused_in_one_line():
    from types import SimpleNamespace

    from fluxjax.errors import UsageError

    cpu = SimpleNamespace(platform="cpu", device_kind="cpu")
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    with pytest.raises(UsageError, match='^attention "cudnn" runs on NVIDIA GPUs only, and this runs on cpu \\(cpu\\): use "auto"$'):
        attention.check_implementation("cudnn", cpu)
    with pytest.raises(UsageError, match="^attention \"cpu\" is fluxjax's CPU kernel, and this runs on NVIDIA H100"):
        attention.check_implementation("cpu", h100)
    with pytest.raises(UsageError, match="^attention 'flash': choose from auto, xla"):
        attention.check_implementation("flash", cpu)
    for impl in ("auto", "xla", "xla_blocked", "splash", "cpu"):
        attention.check_implementation(impl, cpu)  # splash runs anywhere (interpret mode off a TPU)
    attention.check_implementation("cudnn", h100)


def test_cudnn_on_a_cpu_is_one_line_from_the_cli(tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-c", "import sys; from fluxjax.commands.cli import main; sys.exit(main())",
                           "generate", "a cat", "--model", "tiny", "--steps", "1", "--height", "64", "--width", "64",
                           "--attention", "cudnn", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        'fluxjax generate: error: attention "cudnn" runs on NVIDIA GPUs only, and this runs on cpu (cpu): use "auto"')
    assert "Traceback" not in proc.stderr


def test_splash_is_the_transformers_alone_and_the_text_encoders_resolve_auto():
    # The encoders' attention is masked, which splash does not take: asking for splash used to fail
    # in T5 with a traceback (N182).
    from fluxjax.pipeline.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained("tiny", dtype="float32", attention_impl="splash")
    assert pipe.attention_implementation == "splash"
    assert pipe.t5.model.attention_impl == pipe.clip.model.attention_impl == "auto"


def test_splash_gradients_in_interpret_mode_equal_xla_attentions():
    # Training on a TPU differentiates through splash (its dq and dkv kernels): 200 tokens padded
    # to 256, the padded keys masked by segment ids, in the backward too.
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 200, 2, 128)), F32) for _ in range(3))
    w = jnp.asarray(rng.standard_normal((1, 200, 256)), F32)

    def loss(impl):
        return jax.jit(jax.grad(lambda q, k, v: (attention.dot_product_attention(q, k, v, implementation=impl) * w).sum(),
                                argnums=(0, 1, 2)))

    with jax.default_matmul_precision("highest"):
        got, want = loss("splash")(q, k, v), loss("xla")(q, k, v)
    for g, x in zip(got, want):
        err = float(jnp.abs(g - x).max() / jnp.abs(x).max())
        assert err < 1e-5, err
