"""One generation request, one table: every option of `fluxjax generate`, `fluxjax edit` and a
`fluxjax batch` line, each spelled once.

`OPTIONS` has one row (`Option`) per option. Its `name` is the option's one spelling: the JSONL
key of a batch line, the PNG recipe's text chunk, the argparse dest and a batch Job's attribute.
Everything else is derived from the row:
  CLI flag       "--" + name with "-" for "_" (`add_arguments`, `from_args`, `flag`);
  JSONL key      the name; accepted keys, required keys and value types (`parse_line`);
  checks         one function for every surface (`check`): the row's own check of one value
                 (check_seed, check_dimension, check_sigmas, ...), then the relations between
                 options (conditioning.check_request); messages name the flag or "FILE:LINE: key";
  keyword        FluxPipeline.__call__'s (and .edit's) keyword: the name, unless the row declares
                 diffusers' name (mask_image, reference_images, control_image, true_cfg_scale,
                 num_steps) (`keywords`, `batch_keywords`);
  recipe         the PNG text chunks that say what made an image (`recipe_text`, `RECIPE_KEYS`).
Two flags keep a spelling other than the derived one, declared in their rows: `--reference` and
`--lora` are repeated once per file (`--reference a.png --reference b.png`), so each flag names
one file while the option, a list, is plural (`references`, `loras`); and generate's prompt is
the positional PROMPT. Renaming them would break every script that uses them.

Not in the table: what is not part of a request (--model, --out, --dtype, --sharding, ...), and
FlowEdit's PNG recipe (images.edit_text), which keeps the spelling of the files already written
(source_image, source_sha256, prompt = the target prompt) so that resumed batch folders match.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fluxjax.errors import UsageError
from fluxjax.sampling.sampler import SEEDS, check_dimension, check_seed, check_sigmas
from fluxjax.pipeline.text import check_prompt

# fluxjax.conditioning (which imports the autoencoder's model code) is imported where it is used.

GENERATE, EDIT, BATCH = "generate", "edit", "batch"


def _check_sigmas(label: str, value) -> list[float]:
    return check_sigmas(value, label)


def _check_strength(label: str, value) -> None:
    from fluxjax.pipeline.conditioning import strength_start

    strength_start(1, value, label)  # the range


def _at_least(low: int) -> Callable[[str, Any], None]:
    def check(label: str, value) -> None:
        if value < low:
            raise UsageError(f"{label} must be at least {low}, got {value}")
    return check


def _finite(label: str, value) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{label} must be a finite number, got {value}")


def _above_one(label: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 1):
        raise UsageError(f"{label} must be a number > 1, got {value!r}")


def _resize_policies() -> tuple[str, ...]:
    from fluxjax.pipeline.conditioning import RESIZE_POLICIES

    return RESIZE_POLICIES


# Value types: how a flag parses, how a JSONL value is type-checked, how the recipe writes it.
TYPES = {
    "text": "a string",
    "int": "an integer",
    "number": "a number (int or float)",
    "choice": "one string of `choices`",
    "file": "an image path (recipe: its file name and NAME_sha256 of its content)",
    "files": "a list of image paths (CLI: the flag repeated; recipe: names and digests, space-separated)",
    "numbers": "a list of numbers (CLI: comma-separated)",
    "loras": "LoRA files with strengths (CLI: FILE[:SCALE] repeated; JSONL: see fluxjax/batch.py)",
    "name": "a batch line's PNG name (checked by fluxjax/batch.py)",
}


@dataclass(frozen=True)
class Option:
    """One option of a generation request (module docstring).

    name: the one spelling (JSONL key, recipe key, argparse dest). type: a key of TYPES.
    help: the CLI help. keyword: FluxPipeline's keyword where it differs from name ("" for none).
    flag: the CLI flag where it is not the derived one (no "--": a positional argument).
    commands: the CLI commands that take it ("batch": a default for every line of the file).
    lines: the JSONL line kinds that take it ("generate" or "edit"). required: the commands and
    line kinds that cannot go without it. default: the CLI default.
    check: (label, value) -> None or the value as used; raises UsageError "LABEL ...".
    recipe: "" (not recorded), "given" (recorded when given) or "always" ("none" when unset).
    recipe_with: record it (as "none" when unset) whenever this other option is given.
    per_image: a batch call takes one value per image (a list); otherwise one per call, and
    only lines that agree on it share a call. default_from: an image without its own value takes
    this option's (per_image only).
    """

    name: str
    type: str
    help: str
    keyword: str | None = None
    flag: str | None = None
    commands: tuple[str, ...] = (GENERATE,)
    lines: tuple[str, ...] = (GENERATE,)
    required: tuple[str, ...] = ()
    default: Any = None
    choices: Callable[[], tuple[str, ...]] | None = None
    check: Callable[[str, Any], Any] | None = None
    recipe: str = "given"
    recipe_with: str | None = None
    per_image: bool = False
    default_from: str | None = None

    @property
    def cli(self) -> str:
        """The CLI flag (or positional name) that messages use."""
        return self.flag if self.flag is not None else "--" + self.name.replace("_", "-")

    @property
    def call_keyword(self) -> str:
        return self.name if self.keyword is None else self.keyword


OPTIONS = (
    Option("prompt", "text", "what to draw", flag="PROMPT", required=(GENERATE,), check=check_prompt,
           recipe="always", per_image=True),
    Option("prompt_2", "text", "the T5 prompt, when it should differ from PROMPT (CLIP's)", check=check_prompt,
           per_image=True, default_from="prompt"),
    Option("negative_prompt", "text", "true classifier-free guidance away from this prompt", check=check_prompt,
           per_image=True),
    Option("true_cfg", "number", "with --negative-prompt: the true CFG scale (> 1)", keyword="true_cfg_scale",
           check=_above_one, per_image=True),
    Option("seed", "int", f"0 to {SEEDS - 1} (default 0)", commands=(GENERATE, BATCH, EDIT), lines=(GENERATE, EDIT),
           default=0, check=check_seed, recipe="always", per_image=True),
    Option("height", "int", "pixels, a multiple of 16 (default: the model's)", commands=(GENERATE, BATCH),
           check=check_dimension, recipe=""),  # the recipe records the image's "size"
    Option("width", "int", "pixels, a multiple of 16 (default: the model's)", commands=(GENERATE, BATCH),
           check=check_dimension, recipe=""),
    Option("steps", "int", "denoising steps, FlowEdit's T (default: the model's: schnell 4, dev 28, or its folder's "
           "defaults.json)", keyword="num_steps", commands=(GENERATE, BATCH, EDIT), lines=(GENERATE, EDIT),
           check=_at_least(1), recipe="always"),
    Option("guidance", "number", "guidance strength, dev only (default 3.5)", commands=(GENERATE, BATCH),
           check=_finite, recipe="always"),
    Option("sigmas", "numbers", "a custom schedule: decreasing timesteps in (0, 1], comma-separated (sets the step "
           "count)", check=_check_sigmas),
    Option("max_sequence_length", "int", "T5 tokens per prompt (default: dev 512, schnell 256)",
           commands=(GENERATE, BATCH, EDIT), check=_at_least(1)),
    Option("image", "file", "start from this image (img2img; the output has its size)", lines=(GENERATE, EDIT),
           required=(EDIT,), per_image=True),
    Option("strength", "number", "with --image: how much of the schedule runs, in (0, 1] (default 0.6; 1 = from "
           "noise)", check=_check_strength),
    Option("mask", "file", "with --image: inpaint where this mask is white (the image's size)", keyword="mask_image",
           per_image=True),
    Option("resize", "choice", "bring an image (and mask) whose sides are not multiples of 16 to them: crop (drop "
           "the right/bottom remainder) or scale (resample to the nearest multiple); default: refuse it",
           commands=(GENERATE, EDIT), lines=(GENERATE, EDIT), choices=_resize_policies, recipe="",
           recipe_with="image"),
    Option("references", "files", "a reference image (Kontext checkpoints); repeatable", keyword="reference_images",
           flag="--reference", default=(), per_image=True),
    Option("control", "file", "a control image (Canny/Depth control checkpoints)", keyword="control_image",
           per_image=True),
    Option("loras", "loras", "a LoRA .safetensors (diffusers/PEFT, kohya, ComfyUI, XLabs or BFL control) fused into "
           "the transformer at strength SCALE (default 1); repeatable", keyword="", flag="--lora", default=()),
    Option("name", "name", "the PNG's name in the output folder (default: the line's number, 000000.png)",
           keyword="", commands=(), lines=(GENERATE, EDIT), recipe=""),
    Option("source_prompt", "text", "what the image shows", commands=(EDIT,), lines=(EDIT,), required=(EDIT,),
           check=check_prompt, recipe=""),
    Option("target_prompt", "text", "what it should show after the edit", commands=(EDIT,), lines=(EDIT,),
           required=(EDIT,), check=check_prompt, recipe=""),
    Option("n_max", "int", "steps edited, from noise level t_(T - n_max) on (default: dev 24, schnell 3)",
           commands=(EDIT,), lines=(EDIT,), check=_at_least(1), recipe=""),
    Option("n_min", "int", "last steps run as plain sampling of the target (default 0)", commands=(EDIT,),
           lines=(EDIT,), check=_at_least(0), recipe=""),
    Option("n_avg", "int", "noise draws averaged per step (default 1)", commands=(EDIT,), lines=(EDIT,),
           check=_at_least(1), recipe=""),
    Option("source_guidance", "number", "dev only (default 1.5)", commands=(EDIT,), lines=(EDIT,), check=_finite,
           recipe=""),
    Option("target_guidance", "number", "dev only (default 5.5)", commands=(EDIT,), lines=(EDIT,), check=_finite,
           recipe=""),
)
BY_NAME = {o.name: o for o in OPTIONS}

# The PNG text chunks that define a generated image (`recipe_text`): a resumed batch compares them.
# Input files count by content (NAME_sha256), not by name; "size" is the image's, "model" the pipeline's.
RECIPE_KEYS = tuple(o.name + "_sha256" if o.type in ("file", "files") else o.name
                    for o in OPTIONS if o.recipe or o.recipe_with) + ("size", "model")


def keys(kind: str) -> set[str]:
    """The JSONL keys of a line of `kind` ("generate" or "edit")."""
    return {o.name for o in OPTIONS if kind in o.lines}


def flag(name: str) -> str:
    """The CLI flag of option `name` ("--reference" for references, "PROMPT" for prompt)."""
    return BY_NAME[name].cli


# --- the command line -----------------------------------------------------------------------------

def add_arguments(parser, command: str, help: Mapping[str, str] | None = None, skip=()) -> None:
    """The flags of `command`'s options, in table order; `help` replaces a row's help, `skip`
    leaves options out (the command adds them its own way)."""
    for o in OPTIONS:
        if command not in o.commands or o.name in skip:
            continue
        text = (help or {}).get(o.name, o.help)
        if not o.cli.startswith("-"):
            parser.add_argument(o.name, metavar=o.cli, help=text)
            continue
        kw: dict[str, Any] = dict(dest=o.name, help=text, default=o.default)
        if o.type in ("files", "loras"):
            kw.update(action="append", default=[], metavar="IMAGE" if o.type == "files" else "FILE[:SCALE]")
        elif o.type in ("int", "number"):
            kw["type"] = int if o.type == "int" else float
        elif o.type == "choice":
            kw["choices"] = o.choices()
        elif o.type == "numbers":
            kw["metavar"] = "S1,S2,..."
        if command in o.required:
            kw["required"] = True
        parser.add_argument(o.cli, **kw)


def from_args(args, command: str) -> dict:
    """The options given on `command`'s command line, parsed: {name: value}, unset ones left out
    (lists as tuples; loras as (file, scale) pairs)."""
    from fluxjax.lora.adapters import parse_lora_arg

    out = {}
    for o in OPTIONS:
        value = getattr(args, o.name, None) if command in o.commands else None
        if value is None or (o.type in ("files", "loras") and not value):
            continue
        if o.type == "numbers":
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                raise UsageError(f"{o.cli} {value!r}: expected comma-separated numbers, e.g. 1,0.75,0.5,0.25") from None
        elif o.type == "loras":
            value = [parse_lora_arg(x, o.cli) for x in value]
        out[o.name] = tuple(value) if isinstance(value, list) else value
    return out


# --- JSONL lines ----------------------------------------------------------------------------------

def parse_line(fields: dict, kind: str, where: str) -> dict:
    """A batch line's object, checked against the table: no unknown key, the required ones, each
    value's type (name and loras are fluxjax/batch.py's). UsageError "WHERE: ..." at the first fault."""
    known = keys(kind)
    unknown = sorted(set(fields) - known)
    if unknown:
        what = " for an edit" if kind == EDIT else ""
        raise UsageError(f"{where}: unknown key {unknown[0]!r}{what} (expected {', '.join(sorted(known))})")
    for o in OPTIONS:
        if kind in o.required and (not isinstance(fields.get(o.name), str) or not fields[o.name].strip()):
            raise UsageError(f"{where}: missing \"{o.name}\" (a non-empty string)")
    for o in OPTIONS:
        if o.name in fields:
            _check_type(o, fields[o.name], where)
    return fields


def _check_type(o: Option, value, where: str) -> None:
    def fail(what: str):
        raise UsageError(f"{where}: {o.name} must be {what}, got {value!r}")

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if o.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        fail("an integer")
    if o.type == "number" and not number:
        fail("a number")
    if o.type in ("text", "file", "choice") and not isinstance(value, str):
        fail("a string")
    if o.type == "choice" and value not in o.choices():
        fail(f"one of {', '.join(o.choices())}")
    if o.type in ("files", "numbers") and not isinstance(value, list):
        fail("a list")
    if o.type == "files" and not all(isinstance(v, str) for v in value):
        fail("a list of image paths")


def absolute_paths(values: dict, folder: str) -> dict:
    """`values` with its file options' paths joined to `folder` (a JSONL file's)."""
    out = dict(values)
    for o in OPTIONS:
        if o.name in out and o.type == "file":
            out[o.name] = os.path.join(folder, out[o.name])
        elif o.name in out and o.type == "files":
            out[o.name] = tuple(os.path.join(folder, p) for p in out[o.name])
    return out


# --- checks before loading ------------------------------------------------------------------------

def check(values: dict, kind: str = GENERATE, prefix: str = "", name: Callable[[str], str] = lambda key: key) -> dict:
    """Check a request before any model is loaded; return it as it will run.

    values: {option name: value} of the options given (None values count as not given).
    kind: "generate" (then the relations of conditioning.check_request too: pairs, files, sizes)
    or "edit" (FlowEdit's relations are flowedit.EditSettings'). prefix, name: how messages
    name an option: "" and `flag` for the CLI, "FILE:LINE: " and the key for a batch line.
    With an image, height and width become its size; sigmas become floats; lists become tuples.
    """
    import inspect

    from fluxjax.pipeline.conditioning import check_request

    out = {k: v for k, v in values.items() if v is not None}
    for o in OPTIONS:
        if o.check is not None and o.name in out:
            used = o.check(prefix + name(o.name), out[o.name])
            out[o.name] = out[o.name] if used is None else used
    if kind == GENERATE:
        related = list(inspect.signature(check_request).parameters)[2:]  # after prefix and name
        height, width = check_request(prefix, name, **{k: out[k] for k in related if k in out})
        out.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}  # hashable: a batch's shape


# --- the pipeline's keywords ----------------------------------------------------------------------

def keywords(values: Mapping) -> dict:
    """FluxPipeline keywords of a request's options (only those given; lists as lists)."""
    out = {}
    for o in OPTIONS:
        value = values.get(o.name)
        if o.keyword == "" or value is None or value == ():
            continue
        out[o.call_keyword] = list(value) if isinstance(value, tuple) else value
    return out


def batch_shape(values: Mapping) -> tuple:
    """What one batched pipeline call shares (`batch_keywords`): the options taken once per call,
    and for those taken per image, whether they are given (how many, for a list)."""
    shape = []
    for o in OPTIONS:
        value = values.get(o.name)
        if o.keyword == "" or o.default_from is not None:
            continue
        if o.per_image:
            value = len(value or ()) if o.type == "files" else value is not None
        shape.append(value)
    return tuple(shape)


def batch_keywords(requests: list[Mapping]) -> dict:
    """FluxPipeline keywords of one call making an image of each request (of one `batch_shape`):
    a list of one value per image for per-image options, the first request's for the others."""
    out = {}
    for o in OPTIONS:
        if o.keyword == "":
            continue
        values = [r.get(o.name) for r in requests]
        if not o.per_image:
            values = values[0]
        elif all(v is None or v == () for v in values):
            continue
        elif o.default_from is not None:
            values = [r.get(o.default_from) if v is None else v for r, v in zip(requests, values)]
        if values is None or values == ():
            continue
        out[o.call_keyword] = ([list(v) if isinstance(v, tuple) else v for v in values] if o.per_image
                               else list(values) if isinstance(values, tuple) else values)
    return out


# --- the PNG recipe -------------------------------------------------------------------------------

def recipe_text(values: Mapping, width: int, height: int, model: str) -> dict[str, str]:
    """The PNG text chunks of a generated image: its options as used (`values`: steps and
    guidance resolved), its size and model. Input files by name and the SHA-256 of their
    content (the name alone does not say which image it was)."""
    from fluxjax.images import file_sha256

    text = {}
    for o in OPTIONS:
        value = values.get(o.name)
        given = value is not None and value != ()
        if o.recipe_with is not None and values.get(o.recipe_with) is not None:
            text[o.name] = "none" if value is None else str(value)
        elif o.recipe == "always" or (o.recipe == "given" and given):
            if value is None:
                text[o.name] = "none"
            elif o.type in ("file", "files"):
                paths = [value] if o.type == "file" else value
                text[o.name] = " ".join(os.path.basename(p) for p in paths)
                text[o.name + "_sha256"] = " ".join(file_sha256(p) for p in paths)
            elif o.type == "number":
                text[o.name] = f"{value:g}"
            elif o.type == "numbers":
                text[o.name] = ",".join(f"{v:g}" for v in value)
            elif o.type == "loras":
                text[o.name] = " ".join(f"{os.path.basename(f)}:{w:g}" for f, w in value)
            else:
                text[o.name] = str(value)
    return {**text, "size": f"{width}x{height}", "model": model, "software": "fluxjax"}
