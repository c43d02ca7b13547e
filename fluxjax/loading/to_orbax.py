"""PyTorch safetensors -> fluxjax Orbax component folders, streaming, strict and atomic.

`convert(src, dst)` takes
  * a hub folder (model_index.json; diffusers layout): every model component it names is
    converted into the same subfolder of DST, the other subfolders (tokenizers, scheduler) and
    model_index.json are copied, so DST is self-contained;
  * one model folder (config.json of a FluxTransformer2DModel, AutoencoderKL, CLIPTextModel or
    T5EncoderModel): DST is one component folder;
  * a BFL single file (flux1-*.safetensors) or a VAE file (ae.safetensors): DST is one
    transformer or vae component folder.
The layout of a component folder is in fluxjax/checkpoint.py.

Tensors are read one at a time through the key tables of convert/ (every check runs before the
first read); each leaf is written to Orbax and released, so memory is bounded by the largest
(stacked) leaf, not the checkpoint. Everything is written to a folder beside DST that is renamed
to DST only at the end: a failure, Ctrl-C or SIGTERM removes it and leaves DST as it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import sys
import threading
from typing import Callable, Iterator

from tqdm.auto import tqdm

from fluxjax.loading.clip import clip_plan
from fluxjax.loading.flux import BFL_PREFIXES, transformer_plan
from fluxjax.loading.safetensors_io import CheckpointError, TensorSource
from fluxjax.loading.t5 import t5_plan
from fluxjax.loading.table import Plan, strip_prefix
from fluxjax.loading.vae import STRIP_PREFIXES as VAE_PREFIXES
from fluxjax.loading.vae import vae_plan
from fluxjax.checkpoint import PARAMS, ParamsWriter, write_marker

# The class names hub configs give each model (model_index.json, config.json) -> its plan.
PLANS: dict[str, Callable[..., Plan]] = {
    "FluxTransformer2DModel": transformer_plan,
    "AutoencoderKL": vae_plan,
    "CLIPTextModel": clip_plan,
    "T5EncoderModel": t5_plan,
}
# Top-level modules of a diffusers FluxTransformer2DModel: a file with them is not a BFL file.
DIFFUSERS_TRANSFORMER = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.", "time_text_embed.")
STAGING = ".converting-"  # DST + STAGING + pid: where a conversion writes before the final rename


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype="bfloat16", overwrite: bool = False,
            progress: bool | None = None, loras=()) -> dict[str, str]:
    """Convert `src` (see the module docstring) into Orbax component folders at `dst`.

    dtype:     the stored dtype of every parameter ("bfloat16" or "float32").
    overwrite: replace an existing `dst` (only once the new one is complete).
    progress:  show a byte progress bar (None: only on a terminal).
    loras:     [(LoRA file, strength)] fused into the transformer as it is written (fluxjax.lora).
    Returns {subfolder of dst written ("." for a single component): the model kind it holds}.
    Raises CheckpointError / ConfigError (ValueError) naming the file and key, FileExistsError
    if `dst` exists without `overwrite`; on any failure `dst` is untouched.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
    jobs, copies = inventory(src, dtype)
    total = sum(plan.nbytes() for _, plan in jobs)
    with staged(dst) as tmp, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc=f"converting {os.path.basename(src)}", disable=None if progress is None else not progress) as bar:
        for rel, plan in jobs:
            write_component(plan, os.path.join(tmp, rel), dtype, bar.update, loras if plan.kind == "flux" else ())
        for rel in copies:
            source, target = os.path.join(src, rel), os.path.join(tmp, rel)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)
    return {rel: plan.kind for rel, plan in jobs}


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
    if not src.endswith(".safetensors"):
        raise CheckpointError(f"{src}: not a .safetensors file; fluxjax converts safetensors only")
    return [(".", _file_plan(src, dtype))], []


def _hub_jobs(src: str, index: str, dtype):
    with open(index) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    jobs, copies = [], ["model_index.json"]
    for name, value in entries.items():
        if name.startswith("_") or not isinstance(value, list) or value[-1] is None:
            continue  # "_class_name", "_diffusers_version", optional components left empty
        folder = os.path.join(src, name)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{index}: names component {name!r} ({value[-1]}), but {folder} is missing")
        if value[-1] in PLANS:
            jobs.append((name, PLANS[value[-1]](folder, dtype)))
        else:
            copies.append(name)
    if not jobs:
        raise CheckpointError(f"{index}: names none of the models fluxjax converts ({', '.join(PLANS)})")
    return jobs, copies


def _folder_plan(folder: str, dtype) -> Plan:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if cls not in PLANS:
        raise CheckpointError(f"{folder}/config.json: model class {cls!r} is not one fluxjax converts ({', '.join(PLANS)})")
    return PLANS[cls](folder, dtype)


def _file_plan(path: str, dtype) -> Plan:
    """A BFL transformer or a VAE single file, told apart by its keys."""
    keys = TensorSource(path).keys()
    flux = [k[len(strip_prefix(keys, BFL_PREFIXES)):] for k in keys]
    vae = [k[len(strip_prefix(keys, VAE_PREFIXES)):] for k in keys]
    if any(k.startswith("double_blocks.") for k in flux):
        return transformer_plan(path, dtype)
    if any(k.startswith(DIFFUSERS_TRANSFORMER) for k in flux):
        raise CheckpointError(
            f"{path}: diffusers-layout transformer weights; convert the folder holding them with its config.json"
        )
    if keys and all(k.startswith(("encoder.", "decoder.")) for k in vae):
        return vae_plan(path, dtype)
    raise CheckpointError(f"{path}: neither a BFL FLUX transformer nor a FLUX VAE file (keys e.g. {sorted(keys)[:3]})")


def write_component(plan: Plan, folder: str, dtype, progress: Callable[[int], object] | None = None, loras=()) -> None:
    """Write one component folder: its parameters leaf by leaf (with `loras` [(file, strength)]
    fused in: a transformer's), fluxjax.json and the source's config.json."""
    os.makedirs(folder, exist_ok=True)
    writer = ParamsWriter(os.path.join(folder, PARAMS))
    leaves = plan.leaves(dtype, progress)
    if loras:
        from fluxjax import lora

        adapters = lora.load_loras([f for f, _ in loras], plan.config, plan.shapes)
        leaves = lora.fuse_leaves(leaves, adapters, [w for _, w in loras])
    for target, value in leaves:
        writer.add(target, value)
        del value  # the writer holds it until its group is saved
    writer.close()
    write_marker(folder, plan.kind, plan.config, dtype)
    source_dir = plan.source.path if os.path.isdir(plan.source.path) else None
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        shutil.copy2(os.path.join(source_dir, "config.json"), os.path.join(folder, "config.json"))


@contextlib.contextmanager
def staged(dst: str) -> Iterator[str]:
    """A fresh folder beside `dst`, renamed to `dst` when the block ends without error.

    An existing `dst` is replaced only after the new one is complete. On an exception,
    KeyboardInterrupt or SIGTERM the staging folder is removed and the error propagates.
    """
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned(dst)
    tmp = f"{dst}{STAGING}{os.getpid()}"
    os.makedirs(tmp)
    try:
        with _sigterm_raises():
            yield tmp
            if os.path.exists(dst):
                old = f"{dst}.replaced-{os.getpid()}"
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old)
            else:
                os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(dst: str) -> None:
    """Remove staging folders of conversions to `dst` whose process is gone (killed with SIGKILL)."""
    for path in glob.glob(glob.escape(dst) + STAGING + "*"):
        pid = path.rsplit(STAGING, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            print(f"removing {path}, left by an interrupted conversion", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into KeyboardInterrupt for the block, so the staging folder gets removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
