"""Fill (in_channels 384) and structural control (128) against diffusers' FluxFillPipeline and
FluxControlPipeline, and BFL's control LoRAs on a base model against FluxControlPipeline +
load_lora_weights.

Each reference is diffusers' own pipeline on a small random hub folder it saved itself
(fluxjax/reference.py), run from the same noise (`latents=`). Same encoded latents: both
pipelines sample the VAE posterior (`latent_dist.sample(generator)`), fluxjax encodes with the
posterior mean (BFL's choice); the reference's `DiagonalGaussianDistribution.sample` is patched to
return that mean, so both sides condition on the same latents. Limit: pixels on [0, 1] within
1e-3 in float32, as the text-to-image pipeline (tests/test_pipeline.py).
"""

import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxControlPipeline, FluxFillPipeline  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from fluxjax.reference import make_hub_pipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fluxjax import conditioning  # noqa: E402
from fluxjax.errors import UsageError  # noqa: E402
from fluxjax.pipeline import FluxPipeline  # noqa: E402

HEIGHT, WIDTH = 48, 80
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH, STEPS, GUIDANCE = 32, 3, 3.5


@pytest.fixture(scope="module", autouse=True)
def posterior_mean():
    """diffusers' VAE posterior sample -> its mean, the latents fluxjax conditions on (module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
        yield


def random_image(seed, height=HEIGHT, width=WIDTH):
    """A smooth random RGB image (PIL): blocks of colour plus noise, like a photo more than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8, width // 8, 3))
    pixels = np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def random_mask(seed):
    """A grey-level mask image (PIL "L"): a rectangle to repaint, with values either side of 128."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 120, (HEIGHT, WIDTH)).astype(np.uint8)
    mask[8:40, 16:56] = rng.integers(130, 256, (32, 40))
    return Image.fromarray(mask)


def make(tmp_path_factory, name, pipeline_class, **transformer):
    root = tmp_path_factory.mktemp(name)
    reference = make_hub_pipeline(root, "dev", pipeline_class=pipeline_class, **transformer)
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    return types.SimpleNamespace(root=root, reference=reference, noise=noise, pipe=FluxPipeline.from_pretrained(root, dtype="float32"))


def packed(noise):
    return FluxFillPipeline._pack_latents(noise, noise.shape[0], 16, HEIGHT // 8, WIDTH // 8)


def reference_images(hub, **kw):
    with torch.no_grad():
        return hub.reference(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                             latents=packed(hub.noise), max_sequence_length=T5_LENGTH, guidance_scale=GUIDANCE,
                             output_type="np", **kw).images


def ours(hub, pipe=None, **kw):
    return (pipe or hub.pipe)(PROMPTS, num_steps=STEPS, guidance=GUIDANCE, latents=hub.noise.numpy(),
                              max_sequence_length=T5_LENGTH, output="np", **kw)


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return make(tmp_path_factory, "hub_fill", FluxFillPipeline, in_channels=384, out_channels=64)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return make(tmp_path_factory, "hub_control", FluxControlPipeline, in_channels=128, out_channels=64)


def test_variants_read_from_checkpoint(fill, control):
    assert (fill.pipe.variant, control.pipe.variant) == ("fill", "control")
    assert (fill.pipe.defaults.num_steps, fill.pipe.defaults.guidance) == (50, 30.0)  # FluxFillPipeline's
    with pytest.raises(UsageError, match=r"variant='kontext', but .*transformer has 384 input channels, a fill model"):
        FluxPipeline.from_pretrained(fill.root, dtype="float32", variant="kontext")


def test_fill_channels_match_diffusers(fill):
    """The 320 extra features (masked-image latents, packed mask) equal FluxFillPipeline's."""
    image, mask = random_image(1), random_mask(2)
    ref = fill.reference
    init = ref.image_processor.preprocess(image, height=HEIGHT, width=WIDTH).float()
    mask_t = ref.mask_processor.preprocess(mask, height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        m, latents = ref.prepare_mask_latents(mask_t, init * (1 - mask_t), 1, 16, 1, HEIGHT, WIDTH, torch.float32,
                                              "cpu", None)
    want = torch.cat((latents, m), dim=-1).numpy()
    host = conditioning.fill_inputs(image, mask, 1)
    got = np.asarray(conditioning.encode_variant(fill.pipe.vae.model, fill.pipe.vae.params, host)["channels"])
    assert got.shape == want.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 320)
    np.testing.assert_array_equal(got[..., 64:], want[..., 64:])  # the packed mask, exactly
    np.testing.assert_allclose(got[..., :64], want[..., :64], atol=1e-4)
