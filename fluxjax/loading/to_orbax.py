"""PyTorch safetensors -> fluxjax Orbax component folders, streaming, strict and atomic.

`convert(src, dst)` takes
  * a hub folder (model_index.json; diffusers layout): every model component it names is
    converted into the same subfolder of DST, the other subfolders (tokenizers, scheduler) and
    model_index.json are copied, so DST is self-contained;
  * one model folder (config.json of a FluxTransformer2DModel, AutoencoderKL, CLIPTextModel or
    T5EncoderModel): DST is one component folder;
  * a BFL single file (flux1-*.safetensors, an fp8 one, or a GGUF: docs/quantized_files.md) or a
    VAE file (ae.safetensors): DST is one transformer or vae component folder.
The layout of a component folder is in fluxjax/loading/checkpoint.py.

Tensors are read one at a time through the key tables of fluxjax/loading (every check runs before the
first read); each leaf is written to Orbax and released, so memory is bounded by the largest
(stacked) leaf, not the checkpoint. Everything is written to a folder beside DST
(DST.converting-PID) that becomes DST only at the end: a failure, Ctrl-C or SIGTERM removes it
and leaves DST as it was.

Replacing (`overwrite=True`) takes only a folder fluxjax convert itself wrote, every file of it
at every depth (its manifest, `owned_by_fluxjax`), never SRC, a folder holding SRC or one inside
it. The staging, the swap, the lock against a second conversion to the same DST and the removal
of what a killed conversion left follow fluxjax.files, the rule every folder fluxjax replaces
follows: at every instant DST is either the old folder or the new one, complete, and nothing
that appears at DST during the conversion is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from tqdm.auto import tqdm

from fluxjax.loading.checkpoint import FORMAT, MARKER, PARAMS, ParamsWriter, write_marker
from fluxjax.errors import CheckpointError, UsageError
from fluxjax.loading.flux import BFL_PREFIXES, single_file
from fluxjax.loading import gguf, registry
from fluxjax.loading.table import Plan, strip_prefix
from fluxjax.loading.vae import STRIP_PREFIXES as VAE_PREFIXES
from fluxjax.models.quantize import check_mode
from fluxjax.files import MANIFEST, check_creatable, locked, owned_why, shown, staged

# The class names hub configs give each model (model_index.json, config.json) -> its component.
PLANS: dict[str, str] = {spec.hf_class: name for name, spec in registry.COMPONENTS.items()}
# ... and the other class names of the same components (FLUX.2's transformer: FLUX.1's model by its config).
CLASSES: dict[str, str] = {**PLANS, **{alias: name for name, spec in registry.COMPONENTS.items()
                                        for alias in spec.hf_aliases}}
# Top-level modules of a diffusers Flux(2)Transformer2DModel: a file with them is not a BFL file.
DIFFUSERS_TRANSFORMER = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                         "time_text_embed.", "time_guidance_embed.")
COMPONENT_ENTRIES = {MARKER, PARAMS, "config.json"}  # all a component folder written here holds


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype="bfloat16", overwrite: bool = False,
            progress: bool | None = None, loras=(), quantize: str | None = None) -> dict[str, str]:
    """Convert `src` (see the module docstring) into Orbax component folders at `dst`.

    dtype:     the stored dtype of every parameter ("bfloat16" or "float32").
    overwrite: replace an existing `dst` (only once the new one is complete).
    progress:  show a byte progress bar (None: only on a terminal).
    loras:     [(LoRA file, strength)] fused into the transformer as it is written (fluxjax.lora.fused).
    quantize:  None, "int8" or "fp8": the transformer's and T5's Linears stored as the pipeline's
               `quantize` holds them (values + float32 scale per output channel, quantized after
               any LoRA is fused), restored as they are by `from_pretrained(..., quantize=...)`.
    Returns {subfolder of dst written ("." for a single component): the model kind it holds}.
    Raises CheckpointError / ConfigError (ValueError) naming the file and key, FileExistsError
    if `dst` exists without `overwrite` or is not fluxjax's to replace (`check_destination`);
    on any failure `dst` is untouched.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    check_mode(quantize, "--quantize")
    check_destination(src, dst, overwrite)
    jobs, copies = inventory(src, dtype)
    if quantize and not any(_quantizable(plan) for _, plan in jobs):
        raise UsageError(f"--quantize {quantize}: {src} holds no transformer or T5 (the models fluxjax quantizes)")
    total = sum(plan.nbytes() for _, plan in jobs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"converting {os.path.basename(src)}",
               disable=None if progress is None else not progress)
    with locked(dst, "DST"), staged(dst, "convert", overwrite) as tmp, bar:
        for rel, plan in jobs:
            write_component(plan, os.path.join(tmp, rel), dtype, bar.update, loras if plan.kind == "flux" else (),
                            quantize if _quantizable(plan) else None)
        for rel in copies:
            source, target = os.path.join(src, rel), os.path.join(tmp, rel)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)
    return {rel: plan.kind for rel, plan in jobs}


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a DST that converting `src` must not touch.

    DST may not be SRC, hold SRC or lie inside it (paths compared after resolving links). An
    existing DST must be a folder (not a file or a link), is replaced only with `overwrite`, and
    only when fluxjax wrote it (`owned_by_fluxjax`). Raises FileExistsError naming DST.
    """
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src:
        raise FileExistsError(f"{dst}: is the source itself; write the conversion to another folder")
    if os.path.commonpath([real_src, real_dst]) == real_dst:
        raise FileExistsError(f"{dst}: holds the source {src}; write the conversion to another folder")
    if os.path.commonpath([real_src, real_dst]) == real_src:
        raise FileExistsError(f"{dst}: is inside the source {src}; write the conversion to another folder")
    if not os.path.lexists(dst):
        check_creatable(dst, "DST")
        return
    if os.path.islink(dst):
        raise FileExistsError(f"{dst}: is a symbolic link; fluxjax writes a new folder, or replaces one it wrote, "
                              "never a link: remove it or choose another DST")
    if not os.path.isdir(dst):
        raise FileExistsError(f"{dst}: is a file; fluxjax writes a new folder, or replaces one it wrote: "
                              "remove it or choose another DST")
    why = owned_by_fluxjax(dst)
    if why:
        raise FileExistsError(f"{dst}: already exists and was not written by fluxjax convert ({why}); "
                              "fluxjax replaces only its own folders: choose another DST")
    if not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")


def owned_by_fluxjax(folder: str) -> str:
    """Why `folder` (an existing folder) is not one fluxjax convert wrote, or "" when it is.

    Its own: an empty folder (nothing to lose), or one whose every entry, at every depth, is in
    the manifest fluxjax wrote into it (fluxjax.files.owned_why). A folder without a manifest
    is told apart by its top level (`_unlisted_why`): a project folder or a converted folder with
    the user's file beside its components is named as such; one that looks like an older
    fluxjax's conversion is still refused, since files of the user's below its top level (a note
    in tokenizer/, a VAE swapped for the user's own) cannot be told apart.
    """
    entries = set(os.listdir(folder))
    if not entries or MANIFEST in entries:
        return owned_why(folder, "convert")
    return _unlisted_why(folder, entries) or (
        f"it has no {MANIFEST}, the list of the files fluxjax wrote, which fluxjax keeps since 2026-12: files of "
        "yours below its top level cannot be told apart; if it holds nothing of yours, remove it yourself")


def _unlisted_why(folder: str, entries: set[str]) -> str:
    """Why a folder without a manifest is not a conversion by its top level, or "" when it looks like one:
    a component folder (a fluxjax.json of fluxjax's format beside params/, config.json at most) or
    a converted hub folder (model_index.json, only the entries it names, one component at least)."""
    if MARKER in entries:
        return _component_why(folder) or _extra_why(entries - COMPONENT_ENTRIES)
    if "model_index.json" not in entries:
        return f"no {MARKER} or model_index.json in it"
    try:
        index = _read_json(os.path.join(folder, "model_index.json"))
    except CheckpointError as e:
        return str(e)
    named = {name for name in index if not name.startswith("_")}
    why = _extra_why(entries - named - {"model_index.json"})
    if why:
        return why
    components = [name for name in sorted(named & entries) if os.path.isfile(os.path.join(folder, name, MARKER))]
    if not components:
        return "no component folder with a fluxjax.json in it"
    for name in components:
        why = _component_why(os.path.join(folder, name))
        if why:
            return f"{name}/: {why}"
    return ""


def _component_why(folder: str) -> str:
    try:
        record = _read_json(os.path.join(folder, MARKER))
    except CheckpointError as e:
        return str(e)
    if record.get("format") != FORMAT:
        return f"its {MARKER} has format {record.get('format')!r}, not {FORMAT!r}"
    return _extra_why(set(os.listdir(folder)) - COMPONENT_ENTRIES)


def _extra_why(extra: set[str]) -> str:
    if not extra:
        return ""
    return f"it holds {shown(sorted(extra))}, which fluxjax does not write"


def _read_json(path: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file when it is unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def inventory(src: str, dtype) -> tuple[list[tuple[str, Plan]], list[str]]:
    """What converting `src` means: [(subfolder of DST, plan)], [paths copied as they are].

    Each plan has already checked its config and opened its safetensors headers.
    """
    if os.path.isdir(src):
        if src.endswith(".safetensors"):
            raise CheckpointError(f"{src}: is a folder, expected a single .safetensors file (BFL layout)")
        index = os.path.join(src, "model_index.json")
        if os.path.isfile(index):
            return _hub_jobs(src, index, dtype)
        if os.path.isfile(os.path.join(src, "config.json")):
            return [(".", _folder_plan(src, dtype))], []
        raise CheckpointError(f"{src}: neither a hub folder (model_index.json) nor a model folder (config.json)")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    if not src.endswith(".safetensors") and not gguf.is_gguf(src):
        raise CheckpointError(f"{src}: not a .safetensors file; fluxjax converts safetensors and GGUF (.gguf) only")
    return [(".", _file_plan(src, dtype))], []


def _hub_jobs(src: str, index: str, dtype):
    entries = _read_json(index)
    jobs, copies = [], ["model_index.json"]
    for name, value in entries.items():
        if name.startswith("_") or not isinstance(value, list) or value[-1] is None:
            continue  # "_class_name", "_diffusers_version", optional components left empty
        folder = os.path.join(src, name)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{index}: names component {name!r} ({value[-1]}), but {folder} is missing")
        if value[-1] in CLASSES:
            if os.path.isfile(os.path.join(folder, "config.json")):
                _read_json(os.path.join(folder, "config.json"))  # a broken one is named here, by its path
            jobs.append((name, registry.plan(CLASSES[value[-1]], folder, dtype)))
        else:
            copies.append(name)
    if not jobs:
        raise CheckpointError(f"{index}: names none of the models fluxjax converts ({', '.join(CLASSES)})")
    return jobs, copies


def _folder_plan(folder: str, dtype) -> Plan:
    cfg = _read_json(os.path.join(folder, "config.json"))
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if cls not in CLASSES:
        raise CheckpointError(f"{folder}/config.json: model class {cls!r} is not one fluxjax converts ({', '.join(CLASSES)})")
    return registry.plan(CLASSES[cls], folder, dtype)


def _file_plan(path: str, dtype) -> Plan:
    """A BFL transformer (safetensors, fp8 or GGUF) or a VAE single file, told apart by its keys."""
    keys = single_file(path).keys()
    flux = [k[len(strip_prefix(keys, BFL_PREFIXES)):] for k in keys]
    vae = [k[len(strip_prefix(keys, VAE_PREFIXES)):] for k in keys]
    if any(k.startswith("double_blocks.") for k in flux):
        return registry.plan("transformer", path, dtype)
    if any(k.startswith(DIFFUSERS_TRANSFORMER) for k in flux):
        raise CheckpointError(
            f"{path}: diffusers-layout transformer weights; convert the folder holding them with its config.json"
        )
    if keys and all(k.startswith(("encoder.", "decoder.")) for k in vae):
        return registry.plan("vae", path, dtype)
    raise CheckpointError(f"{path}: neither a BFL FLUX transformer nor a FLUX VAE file (keys e.g. {sorted(keys)[:3]})")


def _quantizable(plan: Plan) -> bool:
    return "quantize" in registry.spec(registry.component_of(plan.kind)).options


def write_component(plan: Plan, folder: str, dtype, progress: Callable[[int], object] | None = None, loras=(),
                    quantize: str | None = None) -> None:
    """Write one component folder: its parameters leaf by leaf (with `loras` [(file, strength)]
    fused in: a transformer's; its Linears quantized when `quantize` is "int8" or "fp8"),
    fluxjax.json and the source's config.json."""
    os.makedirs(folder, exist_ok=True)
    writer = ParamsWriter(os.path.join(folder, PARAMS))
    leaves = plan.leaves(dtype, progress)
    if loras:
        from fluxjax.lora.adapters import load_loras
        from fluxjax.lora.fused import fuse_leaves

        adapters = load_loras([f for f, _ in loras], plan.config, plan.shapes)
        leaves = fuse_leaves(leaves, adapters, [w for _, w in loras])
    if quantize:
        leaves = registry.quantized_leaves(registry.component_of(plan.kind), plan.model, leaves, quantize)
    for target, value in leaves:
        writer.add(target, value)
        del value  # the writer holds it until its group is saved
    writer.close()
    write_marker(folder, plan.kind, plan.config, dtype, quantize)
    source_dir = plan.source.path if os.path.isdir(plan.source.path) else None
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        shutil.copy2(os.path.join(source_dir, "config.json"), os.path.join(folder, "config.json"))
