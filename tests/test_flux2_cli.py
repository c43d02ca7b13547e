"""`fluxjax generate --model FOLDER` on FLUX.2 hub folders (the tiny klein, distilled and base,
and [dev] folders of test_flux2_pipeline and test_flux2_dev_pipeline): the PNG holds the pixels
the library call with the same settings makes (text to image, references, inpainting, img2img),
and its recipe; the options FLUX.2 does not take are refused in one line before loading, naming
the flag.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from fluxjax.commands import cli
from test_flux2_dev_pipeline import dev  # noqa: F401
from test_flux2_lora import BFL_LINEARS, _ai_toolkit, _pairs
from test_flux2_pipeline import klein  # noqa: F401

# The library pipelines of the fixtures are float32 with XLA attention.
RUN = ["--steps", "2", "--height", "32", "--width", "48", "--seed", "3", "--dtype", "float32", "--attention", "xla"]
PROMPT = "a red cube on a blue floor"


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch):
    monkeypatch.setenv("FLUXJAX_COMPILATION_CACHE", "off")


def _generate(root, out, *extra):
    """Run the command in this process; return the PNG's pixels (uint8 (H, W, 3)) and recipe."""
    assert cli.main(["generate", PROMPT, "--model", str(root), "--out", str(out), *RUN, *extra]) == 0
    image = Image.open(out)
    return np.asarray(image), dict(image.text)


def _image(path, height, width, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return str(path)


def test_klein_matches_library(klein, tmp_path):  # noqa: F811
    """Distilled: text to image; base: with --negative-prompt and --true-cfg (true CFG)."""
    extra, theirs = [], {}
    if not klein.distilled:
        extra, theirs = ["--negative-prompt", "blurry", "--true-cfg", "3"], dict(negative_prompt="blurry",
                                                                                 true_cfg_scale=3.0)
    got, text = _generate(klein.root, tmp_path / "x.png", *extra)
    (want,) = klein.pipe(PROMPT, 32, 48, num_steps=2, seed=3, output="pil", **theirs)
    assert got.shape == (32, 48, 3) and np.asarray(want).std() > 0
    np.testing.assert_array_equal(got, np.asarray(want))
    recipe = {"prompt": PROMPT, "seed": "3", "steps": "2", "guidance": "none", "size": "48x32", "model": "hub",
              "software": "fluxjax"}
    if not klein.distilled:
        recipe.update(negative_prompt="blurry", true_cfg="3")
    assert text == recipe


def test_dev_guidance_matches_library(dev, tmp_path):  # noqa: F811
    got, text = _generate(dev.root, tmp_path / "x.png", "--guidance", "2.5", "--max-sequence-length", "128")
    (want,) = dev.pipe(PROMPT, 32, 48, num_steps=2, seed=3, guidance=2.5, max_sequence_length=128, output="pil")
    np.testing.assert_array_equal(got, np.asarray(want))
    assert text["guidance"] == "2.5" and text["steps"] == "2" and text["max_sequence_length"] == "128"


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # one klein: the options map the same way
def test_klein_reference_and_inpainting_match_library(klein, tmp_path):  # noqa: F811
    reference = _image(tmp_path / "ref.png", 64, 80, 1)
    got, text = _generate(klein.root, tmp_path / "r.png", "--reference", reference)
    (want,) = klein.pipe(PROMPT, 32, 48, num_steps=2, seed=3, image=[reference], output="pil")
    np.testing.assert_array_equal(got, np.asarray(want))
    assert text["references"] == "ref.png" and "references_sha256" in text

    image = _image(tmp_path / "im.png", 32, 48, 2)
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    got, text = _generate(klein.root, tmp_path / "i.png", "--image", image, "--mask", str(tmp_path / "mask.png"))
    (want,) = klein.pipe(PROMPT, num_steps=2, seed=3, image=image, mask_image=str(tmp_path / "mask.png"),
                         output="pil")
    np.testing.assert_array_equal(got, np.asarray(want))
    assert text["strength"] == "0.8"  # Flux2KleinInpaintPipeline's default, as the call used it

    got, text = _generate(klein.root, tmp_path / "g.png", "--image", image, "--strength", "0.5")  # img2img
    (want,) = klein.pipe(PROMPT, num_steps=2, seed=3, image=image, strength=0.5, output="pil")
    np.testing.assert_array_equal(got, np.asarray(want))
    assert text["strength"] == "0.5"


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # one klein: LoRAs apply alike
def test_klein_lora_matches_library(klein, tmp_path):  # noqa: F811
    """--lora FILE:SCALE fuses the LoRA as load_lora(fuse=True) does (FLUX.2 layouts: test_flux2_lora)."""
    path = _ai_toolkit(tmp_path, "lora.safetensors", _pairs(klein, BFL_LINEARS, 7))
    got, _ = _generate(klein.root, tmp_path / "x.png", "--lora", f"{path}:0.8")
    pipe = copy.copy(klein.pipe)
    pipe.load_lora([(path, 0.8)], fuse=True)
    (want,) = pipe(PROMPT, 32, 48, num_steps=2, seed=3, output="pil")
    (plain,) = klein.pipe(PROMPT, 32, 48, num_steps=2, seed=3, output="pil")
    assert np.abs(np.asarray(want, np.int16) - np.asarray(plain, np.int16)).max() > 10  # the LoRA shows
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("args, flag", [
    (["--quantize", "int8"], "--quantize"),
    (["--control", "IMAGE"], "--control"),
    (["--prompt-2", "another"], "--prompt-2"),
    (["--resize", "crop", "--image", "IMAGE", "--mask", "IMAGE"], "--resize"),
    (["--guidance", "3"], "--guidance"),  # klein has no guidance embedding
])
@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # the refusals do not depend on the klein
def test_refused_before_loading(klein, tmp_path, capsys, args, flag):  # noqa: F811
    (tmp_path / "in").mkdir()
    image = _image(tmp_path / "in" / "im.png", 32, 48, 0)
    args = [image if a == "IMAGE" else a for a in args]
    out = tmp_path / "x.png"
    assert cli.main(["generate", PROMPT, "--model", str(klein.root), "--out", str(out), *RUN, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fluxjax generate: error: {flag}: ") and "FLUX.2" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # a base klein takes CFG (test_klein_matches_library)
def test_cfg_refused_on_distilled_and_dev(klein, dev, tmp_path, capsys):  # noqa: F811
    for root in (dev.root, klein.root):  # the request schema takes the two flags together
        args = ["--negative-prompt", "blurry", "--true-cfg", "3"]
        assert cli.main(["generate", PROMPT, "--model", str(root), "--out", str(tmp_path / "x.png"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fluxjax generate: error: --negative-prompt: ") \
            and "only a base klein" in err[0], err


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)
def test_edit_refused_before_loading(klein, tmp_path, capsys):  # noqa: F811
    """FLUX.2's FlowEdit is the library's (Flux2Pipeline.edit); the command says so in one line."""
    image = _image(tmp_path / "im.png", 32, 48, 0)
    out = tmp_path / "x.png"
    assert cli.main(["edit", image, "--source-prompt", "a cube", "--target-prompt", "a sphere", "--model",
                     str(klein.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a FLUX.2 folder" in err[0] and "Flux2Pipeline.edit" in err[0], err
    assert not out.exists()
