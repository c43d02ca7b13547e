"""The built-in `shapes` model (fluxjax/shapes/weights, written by fluxjax/shapes/recipe.py): it
loads, fits the size budget, draws what a handful of prompts ask (graded by shapes.classify at its
defaults.json), and the training command writes a loadable folder end to end."""

import json
import os

import numpy as np
import pytest

from fluxjax.shapes import dataset as shapes
from fluxjax.bench import shapes as bench
from fluxjax.pipeline.pipeline import FluxPipeline

MAX_BYTES = 8 * 2**20  # the budget for the shipped weights, every file counted

# Three seen and three held-out prompts, every position among them.
PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a purple background in the left",
    "a white triangle on a black background in the top",
    *(shapes.Caption(*combo, position).text
      for combo, position in zip(sorted(shapes.HELD_OUT)[::8], ("right", "bottom", shapes.CENTER))),
]


@pytest.fixture(scope="module")
def shipped():
    return FluxPipeline.from_pretrained(bench.DEFAULT_MODEL)


def test_shipped_folder_fits_budget_and_names_its_defaults():
    from fluxjax.shapes.recipe import folder_bytes

    assert folder_bytes(bench.DEFAULT_MODEL) <= MAX_BYTES
    defaults = bench.load_defaults(bench.DEFAULT_MODEL)
    assert set(defaults) == {"height", "width", "num_steps", "guidance", "max_sequence_length"}
    with open(os.path.join(bench.DEFAULT_MODEL, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "FluxPipeline"


def test_shipped_model_draws_the_prompts(shipped):
    assert sum(shapes.is_held_out(p) for p in PROMPTS) == 3
    images = bench.generate(shipped, PROMPTS, bench.load_defaults(bench.DEFAULT_MODEL))
    results = [shapes.classify(im, p) for im, p in zip(images, PROMPTS)]
    right = {a: sum(r.correct[a] for r in results) for a in shapes.ATTRIBUTES}
    # Measured on the shipped folder (seed 0, 76.0-minute run): 6/6 in every attribute.
    # `fluxjax bench shapes` on 240 prompts: seen 100 / 99.2 / 100 / 100%, held-out 100 / 94.2 /
    # 100 / 100% (colour, shape, background, position): the shape is the attribute that misses, so
    # one of six may.
    assert right["background"] == right["color"] == right["position"] == len(PROMPTS), right
    assert right["shape"] >= 5, right


def test_capitals_and_punctuation_draw_the_same_image_with_a_notice(shipped, tmp_path, monkeypatch, capsys):
    """N166, N167: the tokenizers read a prompt as shapes.parse does (shapes.normalize), so capitals,
    extra spaces and a final period give the lower-case prompt's image bit for bit, each changed
    prompt said in one line (a PromptNormalizedWarning; the CLI prints it as one warning line)."""
    import warnings

    from PIL import Image

    from fluxjax.commands import cli
    from fluxjax.pipeline.pipeline import FluxPipeline, PromptNormalizedWarning, to_uint8

    plain = "a red circle on a blue background"
    want = shipped(plain, seed=3, output="np")
    assert all(shapes.classify(want[0], plain).correct.values())
    for prompt in ("A RED CIRCLE ON A BLUE BACKGROUND.", "a Red Circle on a  Blue background"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = shipped(prompt, seed=3, output="np")
        assert [(w.category, str(w.message)) for w in record] == [
            (PromptNormalizedWarning, f"shapes reads prompts in lower case without final punctuation, as it was "
                                      f"trained: {prompt!r} is read as {plain!r}")]
        np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caption as written: no notice
        shipped(plain, seed=3, output="np")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda cls, source, **k: shipped))
    out = tmp_path / "upper.png"
    capsys.readouterr()
    assert cli.main(["generate", "A RED CIRCLE ON A BLUE BACKGROUND.", "--model", "shapes", "--seed", "3",
                     "--out", str(out)]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert warned == ["fluxjax generate: warning: shapes reads prompts in lower case without final punctuation, as it "
                      f"was trained: 'A RED CIRCLE ON A BLUE BACKGROUND.' is read as {plain!r}"]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), to_uint8(want)[0])


@pytest.mark.slow
def test_training_command_writes_a_loadable_folder(tmp_path):
    from fluxjax.shapes import recipe as train_shapes

    out = tmp_path / "model"
    train_shapes.main(["--seed", "1", "--out", str(out), "--images", "8", "--text-steps", "1", "--vae-steps", "1", "--vae-batch", "2",
                       "--steps", "1", "--batch", "2", "--quiet"])
    assert sorted(os.listdir(out)) == sorted(["defaults.json", "model_index.json", "scheduler", "text_encoder",
                                              "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"])
    assert not os.path.exists(f"{out}.partial")
    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.transformer.model.config.guidance_embed is False
    assert pipe.vae.model.config.z_channels == 16 and pipe.vae.model.config.downsample_factor == 8
    assert np.isfinite(pipe.vae.model.config.scale_factor)


def test_vae_edge_mask_marks_the_outline_and_nothing_flat():
    from fluxjax.shapes.recipe import edge_mask, to_model_pixels

    image = shapes.draw("a red square on a blue background", size=64, seed=0)
    mask = np.asarray(edge_mask(to_model_pixels(image[None])))[0, ..., 0]
    assert set(np.unique(mask)) == {0.0, 1.0}
    # a pixel is marked exactly when its 3x3 neighbourhood (edge pixels repeated) is not one colour
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge").astype(int)
    windows = np.stack([padded[dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)])
    expected = (windows.max(0) - windows.min(0)).max(-1) > 0.05 * 127.5
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert 0 < expected.mean() < 0.2  # the outline: a thin band, not the flat colours
