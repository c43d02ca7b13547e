"""The built-in `shapes` model as the default (issue 18 items 4-5): where it is found, when it is
chosen, the defaults a folder's defaults.json gives, and the warning for a prompt outside its grammar."""

import importlib.resources
import json
import os
import pathlib
import types
import warnings

import pytest
from PIL import Image

from fluxjax.pipeline import pipeline
from fluxjax.shapes import dataset as shapes
from fluxjax.errors import UsageError
from fluxjax.pipeline.pipeline import (DEFAULTS, DefaultModelWarning, Defaults, FluxPipeline, OutOfGrammarWarning,
                              default_source, folder_defaults, packaged_folder)

SHIPPED = pathlib.Path(os.fspath(importlib.resources.files("fluxjax") / "shapes" / "weights"))


def shipped_defaults() -> dict:
    return json.loads((SHIPPED / "defaults.json").read_text())


@pytest.fixture(scope="module")
def shapes_pipe():
    return FluxPipeline.from_pretrained("shapes")


def test_shapes_loads_the_packaged_folder(shapes_pipe):
    assert packaged_folder("shapes") == os.fspath(SHIPPED)
    assert SHIPPED.parent.parent == pathlib.Path(pipeline.__file__).parent.parent  # inside the package: fluxjax/shapes/weights
    assert shapes_pipe.name == "shapes" and shapes_pipe.grammar is shapes.parse
    # its defaults are the ones defaults.json states (those at which its accuracy is measured)
    expected = Defaults(**{**DEFAULTS[shapes_pipe.kind].__dict__, **shipped_defaults()})
    assert shapes_pipe.defaults == expected
    assert packaged_folder("tiny") is None and packaged_folder("FLUX.1-dev") is None


def test_out_of_grammar_prompt_generates_with_one_warning(shapes_pipe):
    with pytest.warns(OutOfGrammarWarning) as record:
        # progress=True as `fluxjax generate` calls it: the CLI test below reuses this compilation
        images = shapes_pipe("a photo of a cat", num_steps=1, output="np", progress=True)
    d = shapes_pipe.defaults
    assert images.shape == (1, d.height, d.width, 3)
    messages = [str(w.message) for w in record if w.category is OutOfGrammarWarning]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "'a photo of a cat'" in messages[0] and shapes.GRAMMAR in messages[0] and "circle, square, triangle" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfGrammarWarning)  # in the grammar (any case, "an"): none
        shapes_pipe("An orange square on a white background in the left", num_steps=1, output="np", progress=True)


def fake_snapshot(cache: pathlib.Path, repo: str) -> pathlib.Path:
    """The hub cache's layout for one downloaded repo (what snapshot_download leaves)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    return snapshot


def test_default_source_is_cached_flux_else_shapes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source, notice = default_source()
    assert source == "shapes" and "\n" not in notice
    assert "shapes" in notice and "snapshot_download('black-forest-labs/FLUX.1-schnell')" in notice and "--model" in notice
    dev = fake_snapshot(tmp_path, pipeline.DEV_REPO)
    assert default_source() == (str(dev), None)
    schnell = fake_snapshot(tmp_path, pipeline.SCHNELL_REPO)  # schnell first: 4 steps
    assert default_source() == (str(schnell), None)


def test_from_pretrained_without_source_is_the_default_model(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(FluxPipeline, "_from_folder", classmethod(lambda cls, root, *a, **k: types.SimpleNamespace(root=root)))
    with pytest.warns(DefaultModelWarning, match="built-in `shapes` model"):
        pipe = FluxPipeline.from_pretrained()
    assert pipe.root == os.fspath(SHIPPED) and pipe.grammar is shapes.parse


def test_missing_packaged_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "WEIGHTS", tmp_path)
    with pytest.raises(UsageError, match=r"^the built-in model 'shapes' is missing from this installation \(.*\): reinstall fluxjax$"):
        packaged_folder("shapes")


def test_generate_without_model_and_no_flux_uses_shapes(tmp_path, monkeypatch, capsys, shapes_pipe):
    """`fluxjax generate` with no --model and an empty hub cache: shapes, said in one line, and an
    out-of-grammar prompt warned about in one line. (.ci/smoke.sh runs it from a wheel with HF_HOME empty.)"""
    from huggingface_hub import constants

    from fluxjax.commands import cli

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = []
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda cls, source, **k: loaded.append(source) or shapes_pipe))
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "a photo of a cat", "--steps", "1", "--out", str(out)]) == 0
    assert loaded == ["shapes"]
    lines = capsys.readouterr().err.splitlines()
    assert [x for x in lines if "shapes` model" in x] == [f"fluxjax generate: {pipeline.SHAPES_NOTICE}"]
    warned = [x for x in lines if x.startswith("fluxjax generate: warning: ")]
    assert len(warned) == 1 and shapes.GRAMMAR in warned[0] and "'a photo of a cat'" in warned[0]
    d = shipped_defaults()
    image = Image.open(out)
    assert (image.width, image.height) == (d["width"], d["height"])
    assert image.text["model"] == "shapes" and image.text["steps"] == "1"


GOOD = {"height": 64, "width": 128, "num_steps": 8, "guidance": None, "max_sequence_length": 32}


@pytest.mark.parametrize("contents, guidance_embed, message", [
    ({**GOOD, "steps": 4}, False, "unknown key 'steps' (expected any of num_steps, guidance, max_sequence_length, height, width)"),
    ({**GOOD, "height": 100}, False, "height 100 is not a multiple of 16; use 96 or 112"),
    ({**GOOD, "num_steps": 0}, False, "num_steps must be an integer >= 1, got 0"),
    ({**GOOD, "max_sequence_length": 16.5}, False, "max_sequence_length must be an integer >= 1, got 16.5"),
    ({**GOOD, "guidance": "high"}, False, "guidance must be a finite number or null, got 'high'"),
    ({**GOOD, "guidance": 3.5}, False, "guidance 3.5 for a transformer without a guidance embedding (set it to null)"),
    (GOOD, True, "guidance null for a transformer with a guidance embedding (give a number)"),
    ([64, 64], False, "expected a JSON object with keys among num_steps, guidance, max_sequence_length, height, width"),
    ("{not json", False, "not a readable JSON file"),
])
def test_defaults_json_errors_name_the_file_and_key(tmp_path, contents, guidance_embed, message):
    path = tmp_path / "defaults.json"
    path.write_text(contents if isinstance(contents, str) else json.dumps(contents))
    with pytest.raises(UsageError) as error:
        folder_defaults(str(tmp_path), guidance_embed)
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_defaults_json_sets_the_keys_it_has(tmp_path):
    assert folder_defaults(str(tmp_path), True) == DEFAULTS["dev"]  # no file: the kind's
    (tmp_path / "defaults.json").write_text(json.dumps(GOOD))
    assert folder_defaults(str(tmp_path), False) == Defaults(**GOOD)
    (tmp_path / "defaults.json").write_text(json.dumps({"height": 512, "guidance": 2}))
    assert folder_defaults(str(tmp_path), True) == Defaults(num_steps=28, guidance=2.0, max_sequence_length=512,
                                                            height=512, width=1024)


def test_bad_defaults_json_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("loaded"))
    for name in os.listdir(SHIPPED):
        if name != "defaults.json":
            os.symlink(SHIPPED / name, tmp_path / name)
    (tmp_path / "defaults.json").write_text(json.dumps({**shipped_defaults(), "seed": 1}))
    with pytest.raises(UsageError, match=r"defaults.json: unknown key 'seed'"):
        FluxPipeline.from_pretrained(str(tmp_path))
