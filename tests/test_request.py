"""The request table (fluxjax/pipeline/request.py): every surface is derived from its rows, so a new row
shows up on each: a flag of its commands, a key of its JSONL lines, a pipeline keyword, a check
that names it as each surface spells it, a PNG recipe chunk. No model is loaded."""

import argparse
import importlib
import inspect
import math

import numpy as np
import pytest
from PIL import Image

from fluxjax.pipeline import request
from fluxjax.errors import UsageError
from fluxjax.images import save_png
from fluxjax.pipeline.request import OPTIONS

# A valid value of each type: as typed on the command line, and as a JSONL value.
CLI_SAMPLE = {"text": ["a cat"], "int": ["32"], "number": ["2.5"], "file": ["in.png"], "files": ["a.png", "b.png"],
              "numbers": ["1,0.5"], "choice": ["crop"], "loras": ["style.safetensors:0.5"]}
JSONL_SAMPLE = {"text": "a cat", "int": 32, "number": 2.5, "file": "in.png", "files": ["a.png"], "numbers": [1, 0.5],
                "choice": "scale", "loras": ["style.safetensors"], "name": "x"}
WRONG_TYPE = {"text": 3, "int": 2.5, "number": "2", "file": 3, "files": "a.png", "numbers": 0.5, "choice": "stretch"}
# A value each row's own check refuses, with what the message says after the option's name.
BAD = {"prompt": ("\udce9", "is not valid UTF-8"), "prompt_2": ("\udce9", "is not valid UTF-8"),
       "negative_prompt": ("\udce9", "is not valid UTF-8"), "true_cfg": (1.0, "must be a number > 1"),
       "seed": (-1, "must be an integer from 0 to"), "height": (40, "40 is not a multiple of 16"),
       "width": (8, "must be an integer >= 16"), "steps": (0, "must be at least 1"),
       "guidance": (math.nan, "must be a finite number"), "sigmas": ([0.5, 1.0], "must decrease strictly"),
       "max_sequence_length": (0, "must be at least 1"), "strength": (1.5, "must be a number in (0, 1]"),
       "source_prompt": ("\udce9", "is not valid UTF-8"), "target_prompt": ("\udce9", "is not valid UTF-8"),
       "n_max": (0, "must be at least 1"), "n_min": (-1, "must be at least 0"), "n_avg": (0, "must be at least 1"),
       "source_guidance": (math.inf, "must be a finite number"), "target_guidance": (math.nan, "must be a finite number")}


def parser_of(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"fluxjax {command}")
    importlib.import_module(f"fluxjax.commands.{command}").add_arguments(parser)
    return parser


def argv(command: str) -> list[str]:
    """The positional arguments and required flags `command` cannot go without."""
    return {"generate": [], "batch": ["p.txt", "--out-dir", "out"], "edit": ["in.png"]}[command]


def test_one_spelling_per_option():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names)) and all(o.type in request.TYPES for o in OPTIONS)
    flags = [o.cli for o in OPTIONS]
    assert len(flags) == len(set(flags))
    # A flag other than the derived one is declared in its row (--reference, --lora, PROMPT) and nowhere else.
    assert {o.name: o.cli for o in OPTIONS if o.cli != "--" + o.name.replace("_", "-")} == {
        "prompt": "PROMPT", "references": "--reference", "loras": "--lora"}


@pytest.mark.parametrize("command", ["generate", "batch", "edit"])
def test_every_option_of_a_command_is_its_flag(command):
    """Each row of `command` appears in its --help and parses, as typed, to the value the request holds."""
    parser = parser_of(command)
    text = parser.format_help()
    rows = [o for o in OPTIONS if command in o.commands]
    assert rows
    for o in rows:
        assert o.cli in text, o.name
        words = [] if o.name == "prompt" else [o.cli] * len(CLI_SAMPLE[o.type])
        given = [w for pair in zip(words, CLI_SAMPLE[o.type]) for w in pair] if words else CLI_SAMPLE[o.type]
        required = [w for r in rows if command in r.required and r is not o
                    for w in ((r.cli, "x") if r.cli.startswith("-") else ("x",))]
        values = request.from_args(parser.parse_args(argv(command) + required + given), command)
        expected = {"int": 32, "number": 2.5, "files": ("a.png", "b.png"), "numbers": (1.0, 0.5),
                    "loras": (("style.safetensors", 0.5),)}.get(o.type, CLI_SAMPLE[o.type][0])
        assert values[o.name] == expected, o.name


@pytest.mark.parametrize("kind", ["generate", "edit"])
def test_every_jsonl_key_is_accepted_and_its_type_checked(kind):
    base = {o.name: "x" for o in OPTIONS if kind in o.required}
    for name in request.keys(kind):
        o = request.BY_NAME[name]
        assert request.parse_line({**base, name: JSONL_SAMPLE[o.type]}, kind, "p.jsonl:1")[name] == JSONL_SAMPLE[o.type]
        if o.type in WRONG_TYPE and name not in base:  # a required key of another type is missing (below)
            with pytest.raises(UsageError, match=f"^p.jsonl:1: {name} must be "):
                request.parse_line({**base, name: WRONG_TYPE[o.type]}, kind, "p.jsonl:1")
    with pytest.raises(UsageError, match="^p.jsonl:1: unknown key 'colour'"):
        request.parse_line({**base, "colour": "red"}, kind, "p.jsonl:1")
    for name in base:
        with pytest.raises(UsageError, match=f'^p.jsonl:1: missing "{name}"'):
            request.parse_line({k: v for k, v in base.items() if k != name}, kind, "p.jsonl:1")


def test_every_check_names_the_option_as_each_surface_spells_it():
    checked = {o.name for o in OPTIONS if o.check is not None}
    assert checked == set(BAD)  # a new row with a check needs its bad value here
    for name, (value, says) in BAD.items():
        kind = "edit" if "generate" not in request.BY_NAME[name].lines + request.BY_NAME[name].commands else "generate"
        for prefix, spelled in (("", request.flag(name)), ("p.jsonl:3: ", name)):
            label = request.flag if not prefix else (lambda key: key)
            with pytest.raises(UsageError) as e:
                request.check({name: value}, kind, prefix, label)
            assert str(e.value).startswith(f"{prefix}{spelled} ") and says in str(e.value), str(e.value)


def test_keywords_are_the_pipelines():
    """Each row's keyword is a parameter of FluxPipeline.__call__ (generate) or .edit (edit only)."""
    from fluxjax.pipeline.pipeline import FluxPipeline

    call = inspect.signature(FluxPipeline.__call__).parameters
    edit = inspect.signature(FluxPipeline.edit).parameters
    for o in OPTIONS:
        if o.keyword == "":
            continue
        generates = "generate" in o.lines + o.commands
        assert o.call_keyword in (call if generates else edit), o.name
    values = {"prompt": "a", "steps": 3, "mask": "m.png", "references": ("r.png",), "true_cfg": 2.0, "name": "x",
              "loras": (("f", 1.0),), "sigmas": (1.0, 0.5)}
    assert request.keywords(values) == {"prompt": "a", "num_steps": 3, "mask_image": "m.png",
                                        "reference_images": ["r.png"], "true_cfg_scale": 2.0, "sigmas": [1.0, 0.5]}


def test_batch_keywords_per_image_and_per_call():
    a = {"prompt": "a", "seed": 1, "steps": 2, "negative_prompt": "n", "true_cfg": 2.0, "references": ("r",)}
    b = {"prompt": "b", "seed": 2, "steps": 2, "negative_prompt": "m", "true_cfg": 3.0, "references": ("s",),
         "prompt_2": "t5"}
    assert request.batch_shape(a) == request.batch_shape(b)  # prompt_2 defaults per image to the prompt
    assert request.batch_shape(a) != request.batch_shape({**a, "steps": 3})
    assert request.batch_keywords([a, b]) == {"prompt": ["a", "b"], "prompt_2": ["a", "t5"],
                                              "negative_prompt": ["n", "m"], "true_cfg_scale": [2.0, 3.0],
                                              "seed": [1, 2], "num_steps": 2, "reference_images": [["r"], ["s"]]}


def test_recipe_round_trips_through_the_png(tmp_path):
    """Every recipe row given: each RECIPE_KEY is written, and the PNG reads back what was written."""
    for name in ("in.png", "mask.png", "control.png", "a.png", "b.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
    path = lambda name: str(tmp_path / name)  # noqa: E731
    values = {"prompt": "a cat", "prompt_2": "a black cat", "negative_prompt": "a dog", "true_cfg": 2.5, "seed": 7,
              "steps": 3, "guidance": 3.5, "sigmas": (1.0, 0.6, 0.3), "image": path("in.png"), "strength": 0.8,
              "mask": path("mask.png"), "references": (path("a.png"), path("b.png")), "control": path("control.png"),
              "loras": ((path("style.safetensors"), 0.5),), "max_sequence_length": 128}
    values = {k: v for k, v in values.items() if k in request.BY_NAME}
    recorded = {o.name for o in OPTIONS if o.recipe or o.recipe_with}
    assert recorded <= set(values) | {"resize"}  # a new recipe row needs its value here
    text = request.recipe_text(values, 16, 16, "tiny")
    assert set(request.RECIPE_KEYS) <= set(text)
    assert (text["resize"], text["guidance"], text["sigmas"], text["references"], text["loras"]) == (
        "none", "3.5", "1,0.6,0.3", "a.png b.png", "style.safetensors:0.5")
    save_png(Image.new("RGB", (16, 16)), path("out.png"), text)
    assert Image.open(path("out.png")).text == text
    # Unset: only the chunks recorded whatever is given.
    assert request.recipe_text({"prompt": "a", "seed": 0, "steps": 1}, 16, 16, "tiny") == {
        "prompt": "a", "seed": "0", "steps": "1", "guidance": "none", "size": "16x16", "model": "tiny",
        "software": "fluxjax"}


def test_an_added_option_reaches_the_pipeline_and_the_recipe(tmp_path, monkeypatch):
    """docs/request-schema.md's example: max_sequence_length, one row, is a flag of generate that
    the pipeline receives and the PNG records."""
    from fluxjax.commands import cli
    from fluxjax.pipeline.pipeline import FluxPipeline

    seen = []
    call = FluxPipeline.__call__
    monkeypatch.setattr(FluxPipeline, "__call__", lambda self, *a, **kw: seen.append(kw) or call(self, *a, **kw))
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a cat", "--model", "tiny", "--height", "32", "--width", "32", "--steps", "1",
                     "--max-sequence-length", "32", "--out", str(out)]) == 0
    assert seen[0]["max_sequence_length"] == 32 and Image.open(out).text["max_sequence_length"] == "32"
