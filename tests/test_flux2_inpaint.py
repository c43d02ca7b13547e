"""FLUX.2 [klein] inpainting against diffusers' Flux2KleinInpaintPipeline: pixels of the tiny klein
hub folders of test_flux2_pipeline (distilled, and base with CFG), two prompts, two sizes, strength 1 (from the
given latents) and a cut schedule (diffusers drawing the same noise from its generator), a mask
whose edge cuts through tokens, a non-multiple-of-16 image (resized), one image_reference; the
refusals; the base klein's inpainting under sp_ring on 8 simulated devices against one device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline
from PIL import Image

from fluxjax.errors import UsageError
from fluxjax.pipeline.flux2_inpaint import inpaint_inputs, mask_tokens
from test_flux2_pipeline import (LENGTH, PIXEL_TOL, PROMPTS, SHARDED_TOL, _latents, _reference_images, klein,  # noqa: F401
                                 sharded, sharded_error)


def _inputs(height, width, seed=5):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: height // 4 + 13, width // 3:] = 255  # 13 rows: an edge inside a token row
    return image, Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpaint(klein):  # noqa: F811
    return Flux2KleinInpaintPipeline(**klein.ref.components, is_distilled=klein.distilled)


def _compare(klein, ref, prompt, image, mask, steps, strength, extra=None):  # noqa: F811
    """max |pixel error| against diffusers; the noise is torch's draw of seed 0 on both sides."""
    extra = extra or {}
    batch = len(prompt) if isinstance(prompt, list) else 1
    pixels, _ = inpaint_inputs(image, mask)
    height, width = pixels.shape[:2]
    theirs = {} if klein.distilled else {"guidance_scale": 4.0}
    if strength == 1.0:  # diffusers starts from given latents as they are: the noise at sigma 1
        theirs["latents"] = _latents(batch, height, width)
    else:  # given latents would skip diffusers' re-noising of the image: let it draw the same noise
        theirs["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want = ref(prompt=prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                   max_sequence_length=LENGTH, output_type="np", **theirs, **extra).images
    got = klein.pipe(prompt, num_steps=steps, latents=_latents(batch, height, width).numpy(), output="np",
                     max_sequence_length=LENGTH, image=image, mask_image=mask, strength=strength, **extra)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    print(f"inpaint {'distilled' if klein.distilled else 'base'} {width}x{height} batch {batch} {steps} steps "
          f"strength {strength} {sorted(extra)}: max |pixel error| {err:.2e} (pixels std {want.std():.3f})")
    assert want.std() > 0.02
    return got, err


@pytest.mark.parametrize("strength, size", [(1.0, (32, 48)), (0.6, (48, 32))])
def test_inpaint_matches_diffusers(klein, inpaint, strength, size):  # noqa: F811
    image, mask = _inputs(*size)
    got, err = _compare(klein, inpaint, PROMPTS, image, mask, 3, strength)
    assert err < PIXEL_TOL
    keep = np.asarray(mask) == 0
    # away from the mask the image is kept (up to the VAE's round trip), inside it is repainted
    assert np.abs(got[0][keep] - np.asarray(image)[keep] / 255.0).mean() < \
        np.abs(got[0][~keep] - np.asarray(image)[~keep] / 255.0).mean()


def test_inpaint_resized_image_and_reference_match_diffusers(klein, inpaint):  # noqa: F811
    image, mask = _inputs(40, 56, seed=6)  # resized (Lanczos) to 32x48 by both
    _, err = _compare(klein, inpaint, PROMPTS[0], image, mask, 2, 0.8,
                      {"image_reference": _reference_images()[0]})
    assert err < PIXEL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("klein", ["base"], indirect=True)  # with true CFG: both passes on the ring
def test_sharded_inpainting_gives_the_single_device_image(klein):  # noqa: F811
    """The previous test's call (two references: the image's tokens and image_reference's) under
    sp_ring over 8 devices: 64 text + 6 image + 6 + 16 reference tokens, padded to the ring."""
    image, mask = _inputs(40, 56, seed=6)
    call = dict(prompt=PROMPTS[0], num_steps=2, latents=_latents(1, 32, 48).numpy(), max_sequence_length=LENGTH,
                image=image, mask_image=mask, strength=0.8, image_reference=_reference_images()[0])
    assert sharded_error(klein.pipe, sharded(klein.root, "sp_ring", (1, 8)), "klein base inpainting",
                         **call) <= SHARDED_TOL


def test_mask_tokens():
    mask = np.zeros((32, 32), np.float32)
    mask[:8, :] = 1  # rows 0-7: the first token row's centre pixels 7 and 8 split
    tokens = mask_tokens(mask, 2, 3)
    assert tokens.shape == (2, 4, 3)
    np.testing.assert_array_equal(tokens[0, :, 0], [0.5, 0.5, 0, 0])
    ref = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(2, 2), mode="bilinear")
    np.testing.assert_array_equal(tokens[0, :, 0], ref.numpy().reshape(-1))


def test_inpaint_refusals(klein):  # noqa: F811
    image, mask = _inputs(32, 48)
    with pytest.raises(UsageError, match="mask_image= needs one image="):
        klein.pipe("x", mask_image=mask, output="np")
    with pytest.raises(UsageError, match="mask_image .* but the image is 48x32"):
        klein.pipe("x", image=image, mask_image=mask.resize((32, 32)), output="np")
    with pytest.raises(UsageError, match="strength must be a number in"):
        klein.pipe("x", image=image, mask_image=mask, strength=1.5, output="np")
    with pytest.raises(UsageError, match="image_reference= is for inpainting"):
        klein.pipe("x", 32, 32, image_reference=image, output="np")
    with pytest.raises(UsageError, match="strength= without mask_image= is img2img: give one image="):
        klein.pipe("x", 32, 32, strength=0.5, output="np")
    with pytest.raises(UsageError, match="keeps the image's size"):
        klein.pipe("x", 64, 64, image=image, mask_image=mask, output="np")
