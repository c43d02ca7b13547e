"""The conditioned denoising loop (sampling.euler_loop / denoise with a `Conditioning`), on the arrays.

A tiny random transformer; each conditioning field is checked against one explicit model call
per step written out here (the contract of sampling.Conditioning), and against properties that
hold whatever the weights: reference tokens act only through attention (permuting them with
their ids changes nothing), true CFG at scale 1 is the positive prompt, a mask of ones is the
unconditioned loop. The pipeline-level parity with diffusers is tests/test_img2img.py.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.sampling import sampler as sampling
from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.models.flux import Flux

B, H, W, L_TXT = 2, 32, 48, 5  # 2 x 3 image tokens
L_IMG = (H // 16) * (W // 16)


def _model(in_channels=64):
    config = dataclasses.replace(FluxConfig.preset("tiny"), in_channels=in_channels, out_channels=64, depth=1,
                                 depth_single_blocks=1)
    model = Flux(config, attention_impl="xla")
    args = (jnp.zeros((1, 1, in_channels)), jnp.zeros((1, 1, 3)), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1, 3)),
            jnp.zeros((1,)), jnp.zeros((1, 32)), jnp.zeros((1,)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    # Random weights drawn on the host (an eager init is slow); none zero, so every velocity is not 0.
    r = np.random.default_rng(in_channels)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(0.1 * r.standard_normal(p.shape), jnp.float32), shapes)
    return model, params


@pytest.fixture(scope="module")
def base():
    model, params = _model()
    r = np.random.default_rng(0)
    normal = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
    inputs = dict(img=normal(B, L_IMG, 64), img_ids=sampling.image_ids(B, H, W), txt=normal(B, L_TXT, 32),
                  txt_ids=sampling.text_ids(B, L_TXT), vec=normal(B, 32),
                  sigmas=sampling.Schedule.dev().sigmas(2, L_IMG), guidance=np.full((B,), 3.5, np.float32))
    return model, params, inputs, normal


def run(model, params, inputs, cond=None, **overrides):
    return np.asarray(sampling.denoise(model, params, **{**inputs, **overrides}, cond=cond))


def manual(model, params, inputs, call, start=0, after_step=None):
    """The Euler loop written out: call(x, t_vec) -> velocity (B, L_img, 64); after_step(x, i) -> x."""
    x, sigmas = jnp.asarray(inputs["img"]), inputs["sigmas"]
    for i in range(start, len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * call(x, jnp.full((B,), sigmas[i], jnp.float32))
        x = x if after_step is None else after_step(x, i)
    return np.asarray(x)


def apply(model, params, inputs, x, t, img_ids=None, txt=None, vec=None):
    return _apply(model, params, x, inputs["img_ids"] if img_ids is None else img_ids,
                  inputs["txt"] if txt is None else txt, inputs["txt_ids"], t,
                  inputs["vec"] if vec is None else vec, inputs["guidance"])


@partial(jax.jit, static_argnums=0)
def _apply(model, params, *args):
    return model.apply({"params": params}, *args)


def test_reference_tokens(base):
    model, params, inputs, normal = base
    ref = normal(B, 4, 64)
    ref_ids = np.broadcast_to(np.array([[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]], np.float32), (B, 4, 3))
    out = run(model, params, inputs, sampling.Conditioning(ref_img=ref, ref_ids=ref_ids))
    assert out.shape == (B, L_IMG, 64)  # the reference tokens are cut from the output
    ids = np.concatenate([inputs["img_ids"], ref_ids], axis=1)
    expected = manual(model, params, inputs,
                      lambda x, t: apply(model, params, inputs, jnp.concatenate([x, ref], 1), t, ids)[:, :L_IMG])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    plain = run(model, params, inputs)
    assert np.abs(out - plain).max() > 1e-3  # the reference reaches the image
    # Only through attention, with its own ids: permuting its tokens with their ids changes nothing.
    perm = np.array([2, 0, 3, 1])
    permuted = run(model, params, inputs, sampling.Conditioning(ref_img=ref[:, perm], ref_ids=ref_ids[:, perm]))
    np.testing.assert_allclose(permuted, out, atol=1e-5, rtol=0)


def test_channels_reach_img_in(base):
    _, _, inputs, normal = base
    model, params = _model(in_channels=64 + 32)
    channels = normal(B, L_IMG, 32)
    out = run(model, params, inputs, sampling.Conditioning(channels=channels))
    expected = manual(model, params, inputs,
                      lambda x, t: apply(model, params, inputs, jnp.concatenate([x, channels], -1), t))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    other = run(model, params, inputs, sampling.Conditioning(channels=channels + 1.0))
    assert np.abs(out - other).max() > 1e-3


def test_inpainting_blend(base):
    model, params, inputs, normal = base
    image, noise = normal(B, L_IMG, 64), normal(B, L_IMG, 64)
    mask = np.zeros((B, L_IMG, 64), np.float32)
    mask[:, : L_IMG // 2] = 1.0  # repaint the first tokens, keep the rest
    sigmas = inputs["sigmas"]
    out = run(model, params, inputs, sampling.Conditioning(image_latents=image, noise=noise, mask=mask))

    def blend(x, i):  # FluxInpaintPipeline: known region re-noised to the next time, the image at the end
        known = sigmas[i + 1] * noise + (1 - sigmas[i + 1]) * image if i < len(sigmas) - 2 else image
        return (1 - mask) * known + mask * x

    expected = manual(model, params, inputs, lambda x, t: apply(model, params, inputs, x, t), after_step=blend)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out[:, L_IMG // 2:], image[:, L_IMG // 2:])  # kept exactly
    ones = run(model, params, inputs, sampling.Conditioning(image_latents=image, noise=noise, mask=np.ones_like(mask)))
    np.testing.assert_array_equal(ones, run(model, params, inputs))


def test_true_cfg(base):
    model, params, inputs, normal = base
    neg_txt, neg_vec, scale = normal(B, L_TXT, 32), normal(B, 32), np.array([4.0, 2.5], np.float32)
    out = run(model, params, inputs, sampling.Conditioning(neg_txt=neg_txt, neg_vec=neg_vec, true_cfg=scale))

    def cfg(x, t):
        pos, neg = apply(model, params, inputs, x, t), apply(model, params, inputs, x, t, txt=neg_txt, vec=neg_vec)
        return neg + scale[:, None, None] * (pos - neg)

    np.testing.assert_allclose(out, manual(model, params, inputs, cfg), atol=1e-5, rtol=0)
    one = run(model, params, inputs, sampling.Conditioning(neg_txt=neg_txt, neg_vec=neg_vec, true_cfg=np.ones(B, np.float32)))
    np.testing.assert_allclose(one, run(model, params, inputs), atol=1e-5, rtol=0)


def test_start_and_no_recompile(base):
    model, params, inputs, normal = base
    out = run(model, params, inputs, sampling.Conditioning(start=np.int32(1)))
    expected = manual(model, params, inputs, lambda x, t: apply(model, params, inputs, x, t), start=1)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    # New conditioning arrays and a new start of the same shapes reuse the executable.
    image, noise, mask = normal(B, L_IMG, 64), normal(B, L_IMG, 64), np.ones((B, L_IMG, 64), np.float32)
    run(model, params, inputs, sampling.Conditioning(start=np.int32(2), image_latents=image, noise=noise, mask=mask))
    compiled = sampling.denoise._cache_size()
    again = run(model, params, inputs, sampling.Conditioning(start=np.int32(0), image_latents=noise, noise=image,
                                                             mask=mask * 0.5), img=normal(B, L_IMG, 64))
    assert sampling.denoise._cache_size() == compiled and np.isfinite(again).all()


@pytest.mark.parametrize("fields, match", [
    (dict(mask=1), "mask needs image_latents, noise, mask; got only mask"),
    (dict(ref_img=1), "reference needs ref_img, ref_ids"),
    (dict(neg_txt=1, neg_vec=1), "true CFG needs neg_txt, neg_vec, true_cfg"),
    (dict(channels=1, ref_img=1, ref_ids=1), "channels and ref_img do not combine"),
])
def test_incomplete_conditioning(fields, match):
    with pytest.raises(UsageError, match=match):
        sampling.Conditioning(**fields).check()


def test_a_new_step_callback_reuses_the_executable(base):
    # The host function a loop reports its steps to is a jit argument (a sampling.StepCallback naming
    # it): a second progress bar compiles nothing, and each loop reports to its own callback only.
    model, params, inputs, _ = base
    seen = {"first": [], "second": []}
    with sampling.step_callback(seen["first"].append) as first:
        want = run(model, params, inputs, on_step=first)
        jax.effects_barrier()
    compiled = sampling.denoise._cache_size()
    with sampling.step_callback(seen["second"].append) as second:
        got = run(model, params, inputs, on_step=second)
        jax.effects_barrier()
    assert sampling.denoise._cache_size() == compiled
    assert seen == {"first": [0, 1], "second": [0, 1]}
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, run(model, params, inputs))  # reporting changes no number
