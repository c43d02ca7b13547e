"""img2img, base-model inpainting, true CFG, prompt_2, embeddings and custom sigmas against diffusers.

The reference is diffusers' own FluxImg2ImgPipeline / FluxInpaintPipeline / FluxPipeline on the
small random dev-like hub folder it saved (fluxjax/testing/reference.py), fp32. The same noise on both
sides: diffusers draws it from a seeded torch.Generator, and fluxjax gets that draw as `latents=`.
The same image latents: diffusers samples the VAE posterior with that generator where fluxjax
takes its mean; here diffusers' retrieve_latents is replaced by its own "argmax" mode (the
posterior mean), so both sides encode to the mean and the generator's first draw is the noise.
Limit: pixels within 1e-3 (the limit of tests/test_pipeline.py).
"""

import os
import types

import jax
import numpy as np
import pytest

import torch

from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline  # noqa: E402
from diffusers.pipelines.flux import pipeline_flux_img2img, pipeline_flux_inpaint  # noqa: E402
from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402
from PIL import Image  # noqa: E402

from fluxjax.errors import UsageError  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402

HEIGHT, WIDTH = 48, 80
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH, STEPS, GUIDANCE = 32, 5, 3.5
LIMIT = 1e-3


def _image(seed: int) -> Image.Image:
    """A smooth random RGB image (a random image upsampled), so the VAE sees structure."""
    small = np.random.default_rng(seed).integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)


def _mask(left: int, right: int) -> Image.Image:
    """White (repaint) columns left .. right-1, not on the 8-pixel grid; a 127 / 128 pair at the
    edges checks the binarization at 0.5."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, left:right] = 255
    mask[:, left - 1], mask[:, right] = 127, 128
    return Image.fromarray(mask, "L")


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_dev")
    reference = make_hub_pipeline(root, "dev")
    return types.SimpleNamespace(root=root, reference=reference, pipe=FluxPipeline.from_pretrained(root, dtype="float32"))


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers encodes images to the VAE posterior's mean, as fluxjax does."""
    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    for module in (pipeline_flux_img2img, pipeline_flux_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mean)


def _ours(hub, **kw):
    return hub.pipe(PROMPTS, num_steps=STEPS, guidance=GUIDANCE, max_sequence_length=T5_LENGTH, output="np", **kw)


def _check(ours, theirs):
    assert ours.shape == theirs.shape == (len(PROMPTS), HEIGHT, WIDTH, 3)
    assert ((theirs > 0) & (theirs < 1)).mean() > 0.9, "mostly clamped pixels would prove little"
    assert np.abs(ours - theirs).max() <= LIMIT


def test_img2img_matches_diffusers(hub, posterior_mean):
    reference = FluxImg2ImgPipeline(**hub.reference.components)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              max_sequence_length=T5_LENGTH, output_type="np")
    # strength 0.7 of 5 steps: int(5 - 3.5) = 1, so 4 steps run, from sigma_1 (checks the cut's rounding).
    with torch.no_grad():
        theirs = reference(prompt=PROMPTS, image=_image(0), strength=0.7, generator=torch.Generator().manual_seed(1),
                           **kw).images
    ours = _ours(hub, image=_image(0), strength=0.7, latents=_noise(1).numpy())
    _check(ours, theirs)
    # Strength 1 starts from pure noise: the text-to-image result on the same noise.
    np.testing.assert_allclose(_ours(hub, image=_image(0), strength=1.0, latents=_noise(1).numpy()),
                               _ours(hub, latents=_noise(1).numpy()), atol=1e-5, rtol=0)


def test_inpainting_matches_diffusers_and_does_not_recompile(hub, posterior_mean):
    reference = FluxInpaintPipeline(**hub.reference.components)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              max_sequence_length=T5_LENGTH, output_type="np")
    with torch.no_grad():
        theirs = reference(prompt=PROMPTS, image=_image(2), mask_image=_mask(13, 50), strength=0.9,
                           generator=torch.Generator().manual_seed(3), **kw).images
    ours = _ours(hub, image=_image(2), mask_image=_mask(13, 50), strength=0.9, latents=_noise(3).numpy())
    _check(ours, theirs)

    # Another image, mask and strength of the same shapes: nothing compiles.
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        other = _ours(hub, image=_image(4), mask_image=_mask(30, 70), strength=0.5, latents=_noise(7).numpy())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and not np.allclose(other, ours)


def test_true_cfg_prompt_2_and_sigmas_match_diffusers(hub):
    noise = _noise(5)
    packed = hub.reference._pack_latents(noise, len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    sigmas = [1.0, 0.8, 0.55, 0.3]
    text = dict(negative_prompt="blurry, low quality", prompt_2=["a cat on a sofa", "a fox and a dog"])
    with torch.no_grad():
        theirs = hub.reference(prompt=PROMPTS, height=HEIGHT, width=WIDTH, sigmas=sigmas, guidance_scale=GUIDANCE,
                               true_cfg_scale=4.0, latents=packed, max_sequence_length=T5_LENGTH, output_type="np",
                               **text).images
    ours = hub.pipe(PROMPTS, sigmas=sigmas, guidance=GUIDANCE, true_cfg_scale=4.0, latents=noise.numpy(),
                    max_sequence_length=T5_LENGTH, output="np", **text)
    _check(ours, theirs)


def test_prompt_embeddings_give_the_prompt_image(hub):
    pipe = hub.pipe
    txt, vec = pipe.encode(*pipe.tokenizer(PROMPTS, T5_LENGTH))
    noise = _noise(6).numpy()
    kw = dict(num_steps=2, guidance=GUIDANCE, latents=noise, output="np")
    np.testing.assert_array_equal(pipe(prompt_embeds=np.asarray(txt), pooled_prompt_embeds=np.asarray(vec), **kw),
                                  pipe(PROMPTS, max_sequence_length=T5_LENGTH, **kw))


@pytest.mark.parametrize("bad, match", [
    (dict(image=_image(0), strength=0.0), r"strength must be a number in \(0, 1\], got 0.0"),
    (dict(image=_image(0), strength=1.5), r"strength must be a number in \(0, 1\], got 1.5"),
    (dict(image=np.zeros((50, 80, 3), np.uint8)), "image is 80x50, not a multiple of 16 on both sides; give a resize"),
    (dict(image=_image(0), mask_image=np.zeros((48, 64), np.uint8)), "mask_image is 64x48 but the image is 80x48"),
    (dict(mask_image=_mask(13, 50)), "mask_image needs an image= to start from"),
    (dict(strength=0.5), "strength needs an image= to start from"),
    (dict(image=_image(0), height=64), "image is 80x48, not height=64, width=None"),
    (dict(reference_images=[_image(0)]), "reference_images needs a FLUX.1 Kontext checkpoint; .* is a base model"),
    (dict(control_image=_image(0)), "control_image needs a FLUX.1 Control checkpoint"),
    (dict(true_cfg_scale=4.0), "true_cfg_scale needs a negative_prompt"),
    (dict(negative_prompt="blurry"), "negative_prompt needs true_cfg_scale"),
    (dict(negative_prompt="blurry", true_cfg_scale=1.0), "true_cfg_scale must be a number > 1"),
    (dict(prompt_embeds=np.zeros((2, 32, 32), np.float32)), "prompt_embeds and pooled_prompt_embeds go together"),
    (dict(sigmas=[1.0, 0.5, 0.7]), "sigmas must decrease strictly within"),
    (dict(sigmas=[1.0, 0.5], num_steps=3), "num_steps 3 but 2 sigmas"),
])
def test_bad_inputs(hub, bad, match):
    with pytest.raises(UsageError, match=match):
        hub.pipe(PROMPTS, max_sequence_length=T5_LENGTH, **{"num_steps": STEPS, **bad})


def test_bad_embeddings(hub):
    with pytest.raises(UsageError, match="give prompt .* or prompt_embeds, not both"):
        hub.pipe(PROMPTS, prompt_embeds=np.zeros((2, 32, 32), np.float32), pooled_prompt_embeds=np.zeros((2, 32), np.float32))
    with pytest.raises(UsageError, match="this transformer takes 32 .T5. and 32"):
        hub.pipe(prompt_embeds=np.zeros((2, 8, 16), np.float32), pooled_prompt_embeds=np.zeros((2, 32), np.float32))


# --- fluxjax generate --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An input image (32 x 48) and a mask for it, as PNG files."""
    folder = tmp_path_factory.mktemp("inputs")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    image.save(folder / "in.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[:, 20:] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    Image.fromarray(mask[:, :32], "L").save(folder / "small_mask.png")
    return folder


def test_generate_inpaints_with_true_cfg_and_records_it(inputs, tmp_path):
    import hashlib

    from fluxjax.commands import cli

    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", "tiny", "--dtype", "float32", "--out", str(out),
            "--image", str(inputs / "in.png"), "--mask", str(inputs / "mask.png"), "--strength", "0.8",
            "--negative-prompt", "a dog", "--true-cfg", "2.5", "--prompt-2", "a black cat", "--sigmas", "1,0.6,0.3"]
    assert cli.main(args) == 0
    image = Image.open(out)
    digest = lambda name: hashlib.sha256((inputs / name).read_bytes()).hexdigest()  # noqa: E731
    assert image.size == (48, 32)
    assert {k: image.text[k] for k in ("image", "image_sha256", "mask", "mask_sha256", "strength", "resize",
                                        "negative_prompt", "true_cfg", "prompt_2", "sigmas", "steps")} == {
        "image": "in.png", "image_sha256": digest("in.png"), "mask": "mask.png", "mask_sha256": digest("mask.png"),
        "strength": "0.8", "resize": "none", "negative_prompt": "a dog", "true_cfg": "2.5", "prompt_2": "a black cat",
        "sigmas": "1,0.6,0.3", "steps": "3"}


@pytest.mark.parametrize("args, message", [
    (["--mask", "{inputs}/mask.png"], "--mask needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "{inputs}/in.png", "--strength", "0"], r"strength must be a number in (0, 1], got 0.0"),
    (["--image", "{inputs}/missing.png"], "--image {inputs}/missing.png: no such file"),
    (["--image", "{inputs}/in.png", "--mask", "{inputs}/small_mask.png"], "is 32x32 but the image is 48x32"),
    (["--image", "{inputs}/in.png", "--height", "64"], "is 48x32: leave --height/--width unset"),
    (["--true-cfg", "3"], "--negative-prompt and --true-cfg go together"),
    (["--negative-prompt", "a dog", "--true-cfg", "1"], "--true-cfg must be a number > 1"),
    (["--sigmas", "1,0.5,0.6"], "--sigmas must decrease strictly"),
    (["--sigmas", "1,x"], "--sigmas '1,x': expected comma-separated numbers"),
    (["--reference", "{inputs}/nope.png"], "--reference {inputs}/nope.png: no such file"),
])
def test_generate_bad_conditioning_writes_nothing(inputs, tmp_path, capsys, args, message):
    from fluxjax.commands import cli

    out = tmp_path / "x.png"
    args = [a.format(inputs=inputs) for a in args]
    assert cli.main(["generate", "a cat", "--model", "tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fluxjax generate: error: ") and message.format(inputs=inputs) in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_reference_refused_on_a_base_model_before_writing(inputs, tmp_path, capsys):
    from fluxjax.commands import cli

    out = tmp_path / "x.png"
    args = ["generate", "a cat", "--model", "tiny", "--out", str(out), "--height", "32", "--width", "32",
            "--reference", str(inputs / "in.png")]
    assert cli.main(args) == 2
    assert "reference_images needs a FLUX.1 Kontext checkpoint; tiny is a base model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- fluxjax batch -----------------------------------------------------------------------------

@pytest.mark.slow
def test_batch_conditioned_lines(inputs, tmp_path):
    import json

    from fluxjax.commands import cli

    lines = [{"prompt": "a cat", "image": "in.png", "mask": "mask.png", "strength": 0.9, "negative_prompt": "a dog",
              "true_cfg": 3.0, "name": "a"},
             {"prompt": "a fox", "image": "in.png", "mask": "mask.png", "strength": 0.9, "negative_prompt": "blur",
              "true_cfg": 2.0, "prompt_2": "a red fox", "name": "b"}]
    prompts = inputs / "jobs.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out-dir", str(out), "--model", "tiny", "--steps", "2", "--batch-size", "2",
            "--dtype", "float32"]
    assert cli.main(args) == 0
    a, b = Image.open(out / "a.png"), Image.open(out / "b.png")
    assert a.size == b.size == (48, 32)
    assert (a.text["negative_prompt"], a.text["true_cfg"], a.text["strength"], a.text["mask"]) == ("a dog", "3", "0.9",
                                                                                                    "mask.png")
    assert (b.text["prompt_2"], b.text["true_cfg"]) == ("a red fox", "2") and "prompt_2" not in a.text
    assert a.text["image_sha256"] == b.text["image_sha256"] and len(a.text["image_sha256"]) == 64
    # A resume does nothing: the recipes (with the inputs' digests) match the manifest.
    assert cli.main(args) == 0


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a", "mask": "mask.png"}, "p.jsonl:1: mask needs image"),
    ({"prompt": "a", "image": "in.png", "strength": 2}, "p.jsonl:1: strength must be a number in (0, 1], got 2"),
    ({"prompt": "a", "image": "nope.png"}, "p.jsonl:1: image {inputs}/nope.png: no such file"),
    ({"prompt": "a", "image": "in.png", "mask": "small_mask.png"}, "p.jsonl:1: mask {inputs}/small_mask.png is 32x32"),
    ({"prompt": "a", "true_cfg": 3}, "p.jsonl:1: negative_prompt and true_cfg go together"),
    ({"prompt": "a", "sigmas": [0.5, 1.0]}, "p.jsonl:1: sigmas must decrease strictly"),
    ({"prompt": "a", "references": "in.png"}, "p.jsonl:1: references must be a list"),
])
def test_batch_bad_conditioning_names_the_line(inputs, tmp_path, capsys, line, message):
    import json

    from fluxjax.commands import cli

    prompts = inputs / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    assert cli.main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--model", "tiny"]) == 2
    assert message.format(inputs=inputs) in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# --- input files as users have them (issue 31) --------------------------------------------------

def test_image_files_are_read_as_people_see_them(tmp_path):
    """N17, N22: a 16-bit PNG is scaled to 8 bits (PIL's convert("RGB") clipped it to white), an
    EXIF orientation is applied (the stored 32 x 48 JPEG is shown, and read, 48 x 32); a mask too."""
    import bad_images

    from fluxjax.pipeline import conditioning

    files = bad_images.make(tmp_path)
    want = np.round(bad_images.gradient16(48) / 257).astype(np.uint8)
    np.testing.assert_array_equal(conditioning.load_image(files["g16"]), np.broadcast_to(want[None, :, None], (32, 48, 3)))
    np.testing.assert_array_equal(conditioning.load_mask(files["g16"], (32, 48)), np.broadcast_to(want >= 128, (32, 48)))
    assert conditioning.image_size(files["exif6"]) == (32, 48) and conditioning.load_image(files["exif6"]).shape == (32, 48, 3)


BOMB = ("DecompressionBombError: Image size (1536 pixels) exceeds limit of 1000 pixels, could be decompression bomb "
        "DOS attack.")


@pytest.mark.parametrize("flag, kind, why", [
    ("--image", "trunc", "OSError: image file is truncated"),  # N2 (N3: a JPEG, the same path)
    ("--image", "bomb", BOMB),  # N15
    ("--mask", "corrupt", "UnidentifiedImageError: cannot identify image file '{path}'"),  # N28
    ("--mask", "trunc", "OSError: image file is truncated"),  # N29
    ("--reference", "trunc", "OSError: image file is truncated"),  # N44
    ("--reference", "bomb", BOMB),  # N45
    ("--control", "trunc", "OSError: image file is truncated"),  # N50
])
def test_damaged_input_files_are_one_line_before_loading(tmp_path, capsys, monkeypatch, flag, kind, why):
    """Each input file is decoded in full before the model loads: one line naming it, exit 2, nothing written."""
    import bad_images

    from fluxjax.commands import cli

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    files = bad_images.make(tmp_path / "in")
    path = files["ok" if kind == "bomb" else kind]
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", bad_images.BOMB_LIMIT)
    given = ["--image", files["ok"], "--mask", path] if flag == "--mask" else [flag, path]
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a cat", "--model", "tiny", "--out", str(out), *given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fluxjax generate: error: {flag} {path}: unreadable image ({why.format(path=path)})"]
    assert sorted(os.listdir(tmp_path)) == ["in"]
