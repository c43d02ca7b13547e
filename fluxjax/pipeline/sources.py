"""Where a pipeline's model comes from: a folder in the hub's diffusers layout, a hub repo id, a
model packaged with fluxjax ("shapes"), "tiny" (random weights), or none (the default model).

`check_source` says at once whether a source can be loaded (before minutes of loading);
`resolve_source` turns it into a folder; `default_source` picks the model loaded when none is
named, with one line for the user when it falls back to the packaged `shapes` model.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import warnings

from fluxjax.errors import UsageError
from fluxjax.pipeline.text import PromptTokenizer

HUB_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
DEV_REPO = "black-forest-labs/FLUX.1-dev"
# Hub-layout folders shipped inside the package as fluxjax/NAME/weights, loaded by NAME (package
# data, found through importlib.resources, so a wheel install has them too). A name here wins over
# a local folder of the same name, as "tiny" does: "./shapes" reaches such a folder.
PACKAGED_MODELS = ("shapes",)
SHAPES_NOTICE = (
    "no FLUX.1 weights in the local hub cache, so this uses the built-in `shapes` model (fluxjax/shapes/weights), "
    "which draws only 'a {color} {shape} on a {color} background[ in the {position}]'; for FLUX.1, run "
    "huggingface_hub.snapshot_download('black-forest-labs/FLUX.1-schnell') on a machine with network "
    "(it is then found in the hub cache) or pass its folder (--model PATH)"
)
# the packaged models' folders: model NAME's is fluxjax/NAME/weights, beside the code that made it
WEIGHTS = importlib.resources.files("fluxjax")


class DefaultModelWarning(UserWarning):
    """`FluxPipeline.from_pretrained()` without a source found no FLUX.1 and loaded `shapes`."""


class PromptNormalizedWarning(UserWarning):
    """The shapes model read a prompt lower-cased, without final punctuation (fluxjax.shapes.dataset.normalize)."""


class NormalizingTokenizer(PromptTokenizer):
    """Tokenizers that see each prompt as `normalize` writes it, saying so (a PromptNormalizedWarning,
    one line per prompt it changed). The shapes model's: its grammar check (shapes.parse) ignores
    case and final punctuation, its tokenizers learnt lower-case captions only, so both must read
    "A RED CIRCLE ON A BLUE BACKGROUND." as "a red circle on a blue background"."""

    def __init__(self, tokenizer: PromptTokenizer, normalize, name: str):
        super().__init__(tokenizer.clip, tokenizer.t5, tokenizer.clip_length)
        self.normalize, self.name = normalize, name

    def _read(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = [self.normalize(p) if isinstance(p, str) else p for p in prompts]
        for before, after in dict.fromkeys(zip(prompts, out)):
            if before != after:
                warnings.warn(f"{self.name} reads prompts in lower case without final punctuation, as it was trained: "
                              f"{before!r} is read as {after!r}", PromptNormalizedWarning, stacklevel=4)
        return out

    def __call__(self, prompts, max_sequence_length: int):
        return super().__call__(self._read(prompts), max_sequence_length)

    def tokenize_t5(self, prompts, max_sequence_length: int):
        return super().tokenize_t5(self._read(prompts), max_sequence_length)

    def tokenize_clip(self, prompts):
        return super().tokenize_clip(self._read(prompts))


def check_source(source: str) -> None:
    """Raise UsageError unless `source` is "tiny", a packaged model's name, a folder, or shaped like
    a hub repo id ("org/name")."""
    if source == "tiny" or source in PACKAGED_MODELS or os.path.isdir(source):
        return
    if os.path.exists(source):
        raise UsageError(f"{source}: expected a pipeline folder (the hub's diffusers layout), not a file; "
                         "pass a BFL transformer file as transformer=")
    if not is_repo_id(source):
        raise UsageError(f"{source}: no such folder")


def is_repo_id(source: str) -> bool:
    """Whether `source`, not a local file or folder, is shaped like a hub repo id ("org/name")."""
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve_source(source: str) -> str:
    """A packaged model's folder; a local folder as is; otherwise a hub repo id through huggingface_hub."""
    check_source(source)
    if source in PACKAGED_MODELS:
        return packaged_folder(source)
    if os.path.isdir(source):
        return source
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{source}: no such folder (and huggingface_hub is not installed to download it)") from None
    try:
        return snapshot_download(source)
    except Exception as e:  # network, auth, unknown repo: all are the user's to fix
        raise UsageError(f"{source}: no such folder, and downloading it from the hub failed: {e}") from None


def local_snapshot(repo: str) -> str | None:
    """`repo`'s snapshot in the local hub cache, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, local_files_only=True)
    except Exception:  # not cached, or huggingface_hub missing: the caller takes another model
        return None


def default_source() -> tuple[str, str | None]:
    """(source, notice): the model loaded when none is named (`fluxjax generate` without --model,
    `FluxPipeline.from_pretrained()`). FLUX.1-schnell, else FLUX.1-dev, from the local hub cache
    (never downloaded), with notice None; else "shapes", with SHAPES_NOTICE: one line for the
    user saying so and how to get the real weights."""
    for repo in (SCHNELL_REPO, DEV_REPO):
        folder = local_snapshot(repo)
        if folder is not None:
            return folder, None
    return "shapes", SHAPES_NOTICE


def packaged_folder(name: str, weights=None) -> str | None:
    """The folder of the packaged model `name` (one of PACKAGED_MODELS), None for other names;
    UsageError when this installation lacks it. weights: where the packaged models live (default
    WEIGHTS, the installed package)."""
    if name not in PACKAGED_MODELS:
        return None
    folder = (WEIGHTS if weights is None else weights) / name / "weights"
    if not folder.is_dir():
        raise UsageError(f"the built-in model {name!r} is missing from this installation ({folder}): reinstall fluxjax")
    return os.fspath(folder)  # a wheel installs unpacked: a real folder on disk


def is_packaged(root: str, name: str) -> bool:
    """Whether folder `root` is the packaged model `name` (by name or by any path to it)."""
    folder = WEIGHTS / name / "weights"
    return folder.is_dir() and os.path.samefile(root, os.fspath(folder))


def packaged_name(root: str) -> str | None:
    """The name of the packaged model in folder `root` ("shapes" for fluxjax/shapes/weights), None for any other folder."""
    return next((name for name in PACKAGED_MODELS if is_packaged(root, name)), None)


def pipeline_class(root: str) -> str | None:
    """model_index.json's `_class_name` in a pipeline folder (hub or converted), None without that file."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("_class_name")


def check_folder(root: str, transformer_file, vae_file) -> None:
    """Raise UsageError unless `root` has the hub layout's folders (but those the BFL single files
    `transformer_file` and `vae_file` replace) and those files exist."""
    needed = [f for f in HUB_FOLDERS if not (f == "transformer" and transformer_file) and not (f == "vae" and vae_file)]
    missing = [f for f in needed if not os.path.isdir(os.path.join(root, f))]
    if missing:
        raise UsageError(f"{root}: not a FLUX pipeline folder, missing {', '.join(m + '/' for m in missing)} "
                         "(expected the hub's diffusers layout)")
    for label, path in (("transformer", transformer_file), ("vae", vae_file)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{label}={os.fspath(path)!r}: no such file (expected a BFL .safetensors file)")

