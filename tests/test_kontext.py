"""Kontext reference images against diffusers' FluxKontextPipeline.

The reference is diffusers' own pipeline on a small random hub folder it saved itself
(fluxjax/testing/reference.py, saved as a FluxKontextPipeline), run from the same noise (`latents=`).
Both encode the reference with the VAE posterior's mode (diffusers' `sample_mode="argmax"`,
fluxjax's posterior mean): the same latents without patching. Limit: pixels on [0, 1] within
1e-3 in float32, as the text-to-image pipeline (tests/test_pipeline.py).
"""

import os
import types

import numpy as np
import pytest

import torch

from diffusers import FluxKontextPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # noqa: E402
from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402
from PIL import Image  # noqa: E402

from fluxjax.pipeline import conditioning  # noqa: E402
from fluxjax.sampling import sampler as sampling  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402

HEIGHT, WIDTH = 48, 80
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH, STEPS, GUIDANCE = 32, 3, 2.5


def random_image(seed, height, width):
    """A smooth random RGB image (PIL): blocks of colour plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (-(-height // 8), -(-width // 8), 3))
    pixels = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width] + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def diffusers_reference_size(height, width):
    """The size FluxKontextPipeline resizes a reference of height x width to (its __call__, step 3)."""
    h, w = height - height % 16, width - width % 16
    _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
    return h // 16 * 16, w // 16 * 16


@pytest.mark.parametrize("size", [(48, 80), (1000, 700), (333, 1200), (1024, 1024), (17, 4000), (700, 1000)])
def test_reference_and_output_sizes(size):
    """The preferred-resolution choice and the output's max_area adjustment follow diffusers'."""
    assert conditioning.kontext_reference_size(*size) == diffusers_reference_size(*size)
    h, w = size
    aspect = w / h
    want = (round((1024**2 / aspect) ** 0.5) // 16 * 16, round((1024**2 * aspect) ** 0.5) // 16 * 16)
    assert conditioning.kontext_output_size(h, w) == want


def test_two_references_ids():
    """N references of the output's size: H x W x (N + 1) tokens in all, reference i's ids (i + 1, row, col)."""
    batch, n = 2, 2
    refs = [random_image(s, HEIGHT, WIDTH) for s in range(n)]
    host = conditioning.kontext_inputs(refs, batch, auto_resize=False)
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    ids = np.concatenate([sampling.image_ids(batch, HEIGHT, WIDTH), host["ref_ids"]], axis=1)
    assert ids.shape == (batch, tokens * (n + 1), 3)
    for i in range(n + 1):
        part = ids[:, i * tokens:(i + 1) * tokens]
        assert (part[..., 0] == i).all()
        np.testing.assert_array_equal(part[..., 1:], sampling.image_ids(batch, HEIGHT, WIDTH)[..., 1:])
    assert [p.shape for p in host["ref_pixels"]] == [(batch, HEIGHT, WIDTH, 3)] * n


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_kontext")
    reference = make_hub_pipeline(root, "dev", pipeline_class=FluxKontextPipeline)
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    return types.SimpleNamespace(root=root, reference=reference, noise=noise,
                                 pipe=FluxPipeline.from_pretrained(root, dtype="float32"))


def ours(kontext, references, **kw):
    """fluxjax's Kontext images, the output kept at HEIGHT x WIDTH (max_area = its area)."""
    return kontext.pipe(PROMPTS, reference_images=references, num_steps=STEPS, guidance=GUIDANCE,
                        latents=kontext.noise.numpy(), max_sequence_length=T5_LENGTH, max_area=HEIGHT * WIDTH,
                        output="np", **kw)


def test_variant_read_from_model_index(kontext, tmp_path):
    """FluxKontextPipeline in model_index.json makes a Kontext model, also after `fluxjax convert`."""
    from fluxjax.loading.to_orbax import convert

    assert kontext.pipe.variant == "kontext"
    assert FluxPipeline.from_pretrained(kontext.root, dtype="float32", variant="base").variant == "base"
    convert(kontext.root, tmp_path / "orbax", dtype="float32")
    assert FluxPipeline.from_pretrained(tmp_path / "orbax", dtype="float32").variant == "kontext"


def test_one_reference_matches_diffusers(kontext):
    """One reference, not resized (a 32 x 64 one, 8 tokens beside the image's 15): diffusers'
    FluxKontextPipeline with _auto_resize=False and the output's area as max_area."""
    reference = random_image(11, 32, 64)
    packed = FluxKontextPipeline._pack_latents(kontext.noise, len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    with torch.no_grad():
        want = kontext.reference(prompt=PROMPTS, image=reference, height=HEIGHT, width=WIDTH,
                                 num_inference_steps=STEPS, latents=packed, max_sequence_length=T5_LENGTH,
                                 guidance_scale=GUIDANCE, max_area=HEIGHT * WIDTH, _auto_resize=False,
                                 output_type="np").images
    got = ours(kontext, [reference], auto_resize=False)
    assert got.shape == want.shape == (len(PROMPTS), HEIGHT, WIDTH, 3)
    assert np.abs(got - want).max() <= 1e-3
    # The reference matters, and a new one of the same size runs without compiling again.
    before = sampling.denoise._cache_size(), conditioning.encode_variant._cache_size()
    other = ours(kontext, [random_image(12, 32, 64)], auto_resize=False)
    assert (sampling.denoise._cache_size(), conditioning.encode_variant._cache_size()) == before
    assert np.abs(other - got).max() > 1e-3  # about 9e-3 on the random model: far above float32's 1e-6


def test_two_references_reach_the_transformer(kontext):
    """Two references of the output's size: the transformer sees H x W x 3 image tokens (traced),
    and the second reference changes the image."""
    import flax.linen as nn

    seen = []

    def record(next_fun, args, kwargs, context):
        if context.module.name == "img_in" and context.method_name == "__call__":
            seen.append(args[0].shape)
        return next_fun(*args, **kwargs)

    refs = [random_image(13, HEIGHT, WIDTH), random_image(14, HEIGHT, WIDTH)]
    with nn.intercept_methods(record):
        two = ours(kontext, refs, auto_resize=False)
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    assert seen and set(seen) == {(len(PROMPTS), tokens * 3, 64)}
    swapped = ours(kontext, [refs[0], random_image(15, HEIGHT, WIDTH)], auto_resize=False)
    # One reference of two moves the random model's pixels by about 8e-3: far above float32's 1e-6.
    assert np.abs(swapped - two).max() > 1e-3


def test_refused_inputs(kontext):
    """Each wrong use of references, masks and Kontext sizes is refused in one line before any work."""
    from fluxjax.errors import UsageError

    ref, area = random_image(16, 32, 64), HEIGHT * WIDTH
    cases = [
        (dict(reference_images=[ref], mask_image=np.zeros((HEIGHT, WIDTH), np.uint8), max_area=area),
         r"mask_image is for inpainting with a base or Fill model; hub_kontext\d* is a kontext model "
         r"\(Kontext edits from reference_images\)"),
        (dict(reference_images=[ref], control_image=ref, max_area=area), r"control_image needs a FLUX.1 Control checkpoint; hub_kontext\d* is a kontext model \(in_channels 128"),
        (dict(reference_images=[]), r"reference_images is empty"),
        (dict(reference_images=[random_image(17, 40, 64)], auto_resize=False, max_area=area),
         r"reference is 64x40, not a multiple of 16 on both sides; give a resize policy"),
        (dict(reference_images=[ref], max_area=HEIGHT * WIDTH * 4), r"latents are for 80x48 images, but with "
         r"reference_images the output is 160x96 \(max_area=15360\); pass max_area=3840"),
        (dict(max_area=HEIGHT * WIDTH), r"max_area and auto_resize apply to reference_images \(Kontext\) only"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            kontext.pipe(PROMPTS, latents=kontext.noise.numpy(), num_steps=1, output="np", **kw)
        assert "\n" not in str(e.value)
    base = FluxPipeline.from_pretrained("tiny", dtype="float32")
    with pytest.raises(UsageError, match=r"reference_images needs a FLUX.1 Kontext checkpoint; tiny is a base model \(pass "
                       r"allow_references=True to append references to a model not trained on them\)"):
        base("a cat", reference_images=[ref], num_steps=1, height=32, width=32)
    # Said on purpose, a base model takes references.
    out = base("a cat", reference_images=[ref], allow_references=True, auto_resize=False, max_area=32 * 32,
               num_steps=1, output="np")
    assert out.shape == (1, 32, 32, 3)


def test_references_per_image():
    """One list of references per image (as `fluxjax batch` gives them): each image's own pixels."""
    a, b = random_image(18, 32, 64), random_image(19, 32, 64)
    host = conditioning.kontext_inputs([[a], [b]], 2, auto_resize=False)
    np.testing.assert_array_equal(host["ref_pixels"][0], conditioning.to_model_pixels(np.stack([np.asarray(a), np.asarray(b)])))
    from fluxjax.errors import UsageError

    with pytest.raises(UsageError, match=r"reference 0: the images of one call need references of one size, got 64x32, 80x48"):
        conditioning.kontext_inputs([[a], [random_image(20, 48, 80)]], 2, auto_resize=False)


# --- the command line: the size made and its limit (issue 31, N35, N46) -------------------------

class SizeSpy:
    """A stand-in Kontext pipeline: records each call's keywords and returns an image of the size
    the real pipeline makes from them (`_kontext_size`: conditioning.kontext_output_size)."""

    name, timings, loras = "spy", {}, []
    kontext_references, default_strength = True, conditioning.DEFAULT_STRENGTH  # as FluxPipeline's

    def __init__(self, defaults):
        self.defaults, self.calls = defaults, []

    def settings(self, steps, guidance, max_sequence_length=None):
        return steps or 1, guidance, max_sequence_length

    def __call__(self, prompts, **kw):
        self.calls.append(kw)
        height, width = conditioning.kontext_output_size(kw["height"], kw["width"], kw["max_area"])
        return [Image.new("RGB", (width, height)) for _ in ([prompts] if isinstance(prompts, str) else prompts)]


@pytest.mark.parametrize("asked, made", [([], (1024, 1024)), (["--height", "64", "--width", "96"], (64, 96)),
                                         (["--height", "512"], (512, 256))])  # tiny: 256x256
def test_generate_makes_the_asked_size(tmp_path, monkeypatch, asked, made):
    """N35: an asked size is made exactly (diffusers keeps only its aspect ratio at 1024**2 pixels:
    64x64 became 1024x1024); without one, diffusers' default for the model's size."""
    from fluxjax.commands import cli
    from fluxjax.pipeline.pipeline import DEFAULTS

    spy = SizeSpy(DEFAULTS["tiny"])
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: spy))
    random_image(0, 16, 16).save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    assert cli.main(["generate", "snow", "--model", "tiny", "--reference", str(tmp_path / "ref.png"), "--out", str(out),
                     *asked]) == 0
    assert Image.open(out).size == made[::-1] and Image.open(out).text["size"] == f"{made[1]}x{made[0]}"
    assert [(c["height"], c["width"], c["max_area"]) for c in spy.calls] == [(*made, made[0] * made[1])]


def test_references_count_in_the_size_limit(tmp_path, capsys, monkeypatch):
    """N46: 40 references of 16 x 16 are each resized to 1024 x 1024 (4,096 tokens) and join every
    step's sequence; the limit counts them and refuses in one line before loading (an 8 GiB device
    here, so the figures do not depend on this machine's RAM)."""
    import jax

    from fluxjax.plan import limits
    from fluxjax.commands import cli
    from fluxjax.config import FluxConfig

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    monkeypatch.setattr(limits, "device_memory", lambda device: (8 << 30, "this host's RAM"))
    random_image(0, 16, 16).save(tmp_path / "ref.png")
    refs = [a for _ in range(40) for a in ("--reference", str(tmp_path / "ref.png"))]
    out = tmp_path / "out.png"
    assert cli.main(["generate", "x", "--model", "tiny", "--height", "64", "--width", "64", *refs, "--out", str(out)]) == 2
    limit = limits.SizeLimit(FluxConfig.preset("tiny"), 64, 1, "bfloat16", None, jax.devices()[:1])
    need = limit.step_bytes(16 + 40 * 4096)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fluxjax generate: error: --width/--height 64x64 with 40 reference image(s) (163,840 tokens): one denoising "
        f"step needs {need / 2**30:,.1f} GiB per device for its activations (fluxjax plan's analytic figure, 1 image(s) "
        f"per device), more than the 8.0 GiB of this host's RAM; the most this model can take here is "
        f"{limit.largest_tokens():,} tokens of image and references (a reference is resized to about 1024x1024 pixels, "
        "4,096 tokens): give fewer references or a smaller size"]
    assert sorted(os.listdir(tmp_path)) == ["ref.png"]
    # One reference fits: the limit counts, it does not refuse references as such.
    assert limit.step_bytes(16 + 4096) <= 8 << 30


def test_a_reference_too_small_is_named_with_its_file(tmp_path):
    # The probe's N39, re-run: the refusal came before loading but no longer named the file.
    from PIL import Image

    from fluxjax.pipeline import conditioning
    from fluxjax.errors import UsageError

    path = tmp_path / "1x1.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    with pytest.raises(UsageError) as e:
        conditioning.kontext_reference_sizes([path], "--reference")
    assert str(e.value) == f"--reference {path} is 1x1: smaller than 16x16 pixels"
