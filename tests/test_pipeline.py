"""FluxPipeline and the sampling pieces against diffusers' FluxPipeline, end to end.

The reference is diffusers' own pipeline on a small random hub-layout folder it saved itself
(fluxjax/testing/reference.py); both start from the same noise (`latents=`). Limits: pixels on [0, 1]
within 1e-3 in float32 (measured: about 5e-6 dev-like, 2e-6 schnell-like); the schedule within
1e-6 of BFL's formula and of diffusers' sigmas.
"""

import os
import types

import jax
import numpy as np
import pytest

import torch

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers import FluxPipeline as DiffusersFluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from fluxjax.testing.reference import SCHEDULERS, make_hub_pipeline  # noqa: E402

from fluxjax.sampling import sampler as sampling  # noqa: E402
from fluxjax.errors import UsageError  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline, to_uint8  # noqa: E402

HEIGHT, WIDTH = 48, 80  # 3 x 5 tokens: a swapped height and width shows
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH = 32
STEPS = {"dev": 5, "schnell": 4}

# docs/model-reference.md, "Schedule": dev, 1024x1024 (4096 tokens, mu = 1.15), 28 steps.
BFL_DEV_1024_28 = [
    1.0, 0.988409, 0.976222, 0.963394, 0.949873, 0.935599, 0.920509, 0.904531, 0.887583,
    0.869576, 0.850406, 0.829956, 0.808095, 0.784672, 0.759511, 0.732413, 0.703145, 0.671435,
    0.636965, 0.599357, 0.558163, 0.512844, 0.462748, 0.407078, 0.344849, 0.274828, 0.195455,
    0.104721, 0.0,
]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def hub(request, tmp_path_factory):
    """The hub folder, diffusers' images for PROMPTS from fixed noise, and fluxjax's pipeline on it."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"hub_{kind}")
    reference = make_hub_pipeline(root, kind)
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    packed = DiffusersFluxPipeline._pack_latents(noise, len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    guidance = {"guidance_scale": 3.5} if kind == "dev" else {}
    with torch.no_grad():
        images = reference(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS[kind], latents=packed,
                           max_sequence_length=T5_LENGTH, output_type="np", **guidance).images
    pipe = FluxPipeline.from_pretrained(root, dtype="float32")
    return types.SimpleNamespace(kind=kind, root=root, noise=noise.numpy(), images=images, pipe=pipe,
                                 guidance=3.5 if kind == "dev" else None)


def test_pipeline_matches_diffusers(hub):
    ours = hub.pipe(PROMPTS, num_steps=STEPS[hub.kind], guidance=hub.guidance, latents=hub.noise,
                    max_sequence_length=T5_LENGTH, output="np")
    assert ours.shape == hub.images.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == np.float32
    inside = ((hub.images > 0) & (hub.images < 1)).mean()
    assert inside > 0.9, "the fixture's pixels should not be mostly clamped, or the comparison proves little"
    assert np.abs(ours - hub.images).max() <= 1e-3
    assert hub.pipe.kind == hub.kind  # read from the checkpoint: guidance embedding or not
    assert "double_blocks" in hub.pipe.transformer.params  # one layout: the blocks stacked, also on a CPU


def test_kind_defaults_and_guidance(hub):
    p = hub.pipe
    if hub.kind == "dev":
        assert (p.defaults.num_steps, p.defaults.guidance, p.defaults.max_sequence_length) == (28, 3.5, 512)
        assert p.schedule.use_dynamic_shifting
    else:
        assert (p.defaults.num_steps, p.defaults.guidance, p.defaults.max_sequence_length) == (4, None, 256)
        assert not p.schedule.use_dynamic_shifting
        with pytest.raises(UsageError, match="no guidance embedding"):
            p(PROMPTS[0], latents=hub.noise[:1], guidance=3.5, num_steps=1)


def test_second_call_does_not_compile(hub):
    """Same size, new seeds and prompts: every compiled function is reused."""
    p = hub.pipe
    kw = dict(height=HEIGHT, width=WIDTH, num_steps=2, max_sequence_length=T5_LENGTH, output="np")
    first = p(["a red fox", "a blue bird"], seed=1, **kw)
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = p(["a bowl of ramen on a table", "an old man"], seed=[7, 8], **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert not np.allclose(first, second)


def test_image_depends_only_on_its_own_seed(hub):
    kw = dict(height=HEIGHT, width=WIDTH, num_steps=2, max_sequence_length=T5_LENGTH, output="np")
    batch = hub.pipe(PROMPTS, seed=10, **kw)
    alone = hub.pipe(PROMPTS[1], seed=11, **kw)
    # The same noise and prompt; batch 1 and batch 2 are different executables, whose float32
    # rounding differs (measured 1.4e-6), so "the same image" is equality to fp32 parity.
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5, rtol=0)


def test_pil_output(hub):
    images = hub.pipe(PROMPTS[0], latents=hub.noise[:1], num_steps=1, max_sequence_length=T5_LENGTH, output="pil")
    array = hub.pipe(PROMPTS[0], latents=hub.noise[:1], num_steps=1, max_sequence_length=T5_LENGTH, output="np")
    assert len(images) == 1 and images[0].size == (WIDTH, HEIGHT) and images[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(images[0]), to_uint8(array)[0])


@pytest.mark.parametrize("bad, match", [
    (dict(height=50, width=WIDTH), "height 50 is not a multiple of 16"),
    (dict(height=HEIGHT, width=WIDTH, num_steps=0), "num_steps must be an integer >= 1"),
    (dict(latents=np.zeros((1, 16, 6, 10), np.float32), height=64), "are for 48x80 images"),
    (dict(latents=np.zeros((3, 16, 6, 10), np.float32)), "2 prompts but latents for 3 images"),
    (dict(latents=np.zeros((2, 4, 6, 10), np.float32)), r"shape \(B, 16, H/8, W/8\)"),
    (dict(seed=[1]), "list of 2 ints"),
    (dict(output="tensor"), "output must be 'np' or 'pil'"),
])
def test_bad_arguments(hub, bad, match):
    with pytest.raises(UsageError, match=match):
        hub.pipe(PROMPTS, **{"max_sequence_length": T5_LENGTH, **bad})


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(UsageError, match="missing vae/, text_encoder/"):
        FluxPipeline.from_pretrained(tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        FluxPipeline.from_pretrained(tmp_path / "nowhere")


# --- schedule, packing, ids ---------------------------------------------------------------------

def test_schedule_matches_bfl_reference_values():
    sigmas = sampling.Schedule.dev().sigmas(28, 4096)
    assert sigmas.dtype == np.float32 and sigmas.shape == (29,)
    np.testing.assert_allclose(sigmas, BFL_DEV_1024_28, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(sampling.Schedule.schnell().sigmas(4, 4096), [1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("steps, height, width", [(1, 256, 256), (4, 1024, 1024), (28, 512, 768), (50, 768, 1360), (8, 2048, 2048)])
def test_schedule_matches_diffusers(kind, steps, height, width):
    tokens = (height // 16) * (width // 16)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[kind])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    ours = sampling.Schedule.from_config(dict(scheduler.config)).sigmas(steps, tokens)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=1e-6, rtol=0)


def test_schedule_config_is_read_from_the_hub_folder(hub):
    assert sampling.Schedule.from_config(os.path.join(hub.root, "scheduler")) == hub.pipe.schedule


@pytest.mark.parametrize("option", ["use_karras_sigmas", "invert_sigmas", "shift_terminal"])
def test_schedule_refuses_options_it_does_not_implement(option):
    with pytest.raises(UsageError, match=option):
        sampling.Schedule.from_config({**SCHEDULERS["dev"], option: 0.5 if option == "shift_terminal" else True})


def test_pack_unpack_and_ids_match_diffusers():
    rows, cols = HEIGHT // 16, WIDTH // 16
    latents = torch.randn(2, 16, 2 * rows, 2 * cols)
    packed = DiffusersFluxPipeline._pack_latents(latents, 2, 16, 2 * rows, 2 * cols).numpy()
    np.testing.assert_array_equal(np.asarray(sampling.pack(latents.numpy())), packed)
    np.testing.assert_array_equal(np.asarray(sampling.unpack(packed, HEIGHT, WIDTH)), latents.numpy())
    ids = DiffusersFluxPipeline._prepare_latent_image_ids(2, rows, cols, "cpu", torch.float32).numpy()
    ours = sampling.image_ids(2, HEIGHT, WIDTH)
    assert ours.shape == (2, rows * cols, 3)
    np.testing.assert_array_equal(ours[1], ids)


def test_noise_shape_and_seed_independence():
    both = np.asarray(sampling.noise([3, 4], 32, 64))
    assert both.shape == (2, 16, 4, 8) and both.dtype == np.float32
    np.testing.assert_array_equal(both[1], np.asarray(sampling.noise([4], 32, 64))[0])
    assert not np.allclose(both[0], both[1])


def test_orbax_checkpoint_gives_the_same_image(hub, tmp_path):
    """`fluxjax convert` of the hub folder, then the pipeline on the Orbax folder: the same pixels."""
    from fluxjax.commands.cli import main

    dst = tmp_path / "orbax"
    assert main(["convert", str(hub.root), str(dst), "--dtype", "float32"]) == 0
    converted = FluxPipeline.from_pretrained(dst, dtype="float32")
    assert converted.kind == hub.pipe.kind and converted.schedule == hub.pipe.schedule
    kw = dict(num_steps=2, guidance=hub.guidance, latents=hub.noise, max_sequence_length=T5_LENGTH, output="np")
    np.testing.assert_array_equal(converted(PROMPTS, **kw), hub.pipe(PROMPTS, **kw))
