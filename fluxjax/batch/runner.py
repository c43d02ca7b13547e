"""Batch generation: many prompts to PNGs in a folder, split over hosts, resumable.

Jobs. A prompts file is text (one prompt a line) or JSONL (`.jsonl`: one object a line with
"prompt" and optional "seed", "height", "width", "steps", "guidance", "name", "loras", and the
conditioning keys "image", "strength", "mask", "resize", "references", "control",
"negative_prompt", "true_cfg", "prompt_2", "sigmas" of `fluxjax generate`'s flags (paths relative
to the JSONL file's folder; the PNG records the inputs' SHA-256)); blank lines are skipped. A
JSONL line with "image" and no "prompt" is an edit job (FlowEdit, fluxjax/sampling/flowedit.py): "image" (a
path, relative to the JSONL file's folder), "source_prompt", "target_prompt" and optional "seed",
"steps", "n_max", "n_min", "n_avg", "source_guidance", "target_guidance", "resize", "name"; its
size is the image's, and its recipe includes the image's SHA-256 (edits take no LoRAs). Job k
(the k-th prompt, from 0) is written as `name` or else `{k:06d}.png`, with seed
`seed + k` unless it gives its own: an image's noise depends on its job only (sampling.noise
draws each image's noise from its own seed). Its pixels also depend on the run's settings
(RUN_KEYS: the compiled batch size, dtype, devices, sharding, JAX version, weight quantization), since XLA picks
other kernels and summation orders for another batch shape or device; not on the number of
hosts, nor on which jobs share its batch. Every manifest record carries those settings, and
a resume with other settings is refused: one folder never mixes two runs' pixels. "loras" is a
list of "FILE" / "FILE:SCALE" strings or [FILE, SCALE] pairs (paths relative to the prompts
file): every LoRA of the file is loaded live once, and each image runs with its own strengths
(0 for the LoRAs it does not name), so images with different LoRAs share a batch.

Hosts. Job k belongs to host k % process_count; each host generates its own jobs on its local
devices, independently of the others. Round robin keeps every shape group balanced over hosts.

Batches. A host groups its jobs by shape (height, width, steps, guidance) and runs them
batch_size at a time. The last batch of a group is padded to batch_size by repeating its last
job and the extra images are dropped: a new batch size would cost a compile (seconds on CPU,
a minute at full size on a TPU), more than the padding's wasted compute.

Manifest. Host h appends one JSON line per finished image to `DIR/manifest-{h:05d}.jsonl`,
fsynced after the PNG itself (written under a temporary name, renamed, fsynced): a line means
the image is complete on disk. Each host writes only its own file, so several hosts can share
DIR without locks. A restart reads every host's manifest and skips the jobs recorded there (for
the same recipe; a recorded image of another recipe under the same name is an error, never
overwritten). A PNG present but not recorded (the process died between the rename and the
manifest line) is generated again and replaced: the PNG alone cannot prove which run or model
made it, and regeneration gives the same pixels, so the outcome does not depend on when the
kill came.

Two runs on one DIR must not overlap in time unless they are the hosts of one run: a job's
single writer is its host under the current process count.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields as dataclass_fields, replace
from typing import ClassVar
from itertools import groupby

from fluxjax.errors import UsageError
from fluxjax.images import LONGEST_NAME, fsync_dir, png_text, remove_temporaries, save_png
from fluxjax.sampling.sampler import check_dimension, check_seed
from fluxjax.pipeline.text import check_prompt, decode_line

# Image conditioning and guidance: FluxPipeline's keywords image, strength, mask_image, resize,
# reference_images, control_image, negative_prompt, true_cfg_scale, prompt_2, sigmas.
CONDITIONING_KEYS = {"image", "strength", "mask", "resize", "references", "control", "negative_prompt", "true_cfg",
                     "prompt_2", "sigmas"}
JSONL_KEYS = {"prompt", "seed", "height", "width", "steps", "guidance", "name", "loras"} | CONDITIONING_KEYS
EDIT_KEYS = {"image", "source_prompt", "target_prompt", "seed", "steps", "n_max", "n_min", "n_avg", "source_guidance",
             "target_guidance", "resize", "name"}
# PNG text chunks that define an image (images.png_text, images.conditioning_text)
RECIPE_KEYS = ("prompt", "seed", "steps", "guidance", "size", "model", "loras", "image_sha256", "mask_sha256",
               "references_sha256", "control_sha256", "strength", "resize", "negative_prompt", "true_cfg", "prompt_2",
               "sigmas")
# What else an image's pixels depend on (measured: docs/usage.md, "Many prompts"), recorded with every
# image in the manifest; a resume that would change one of them is refused.
RUN_KEYS = ("batch_size", "dtype", "sharding", "devices", "jax", "quantize")
# A RUN_KEY that manifests written before it existed lack, with the value those runs had.
RUN_KEY_BEFORE = {"quantize": "none"}


@dataclass(frozen=True)
class Job:
    """One image to make. `where` is "FILE:LINE" of its prompt, for error messages.

    height, width, steps, guidance are None until `resolve` fills in the model's defaults;
    guidance stays None for models without a guidance embedding.
    """

    index: int
    where: str
    name: str
    prompt: str
    seed: int
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (absolute path, strength)
    # Conditioning (CONDITIONING_KEYS; paths absolute): None / () when not asked for.
    image: str | None = None
    strength: float | None = None
    mask: str | None = None
    resize: str | None = None
    references: tuple[str, ...] = ()
    control: str | None = None
    negative_prompt: str | None = None
    true_cfg: float | None = None
    prompt_2: str | None = None
    sigmas: tuple[float, ...] | None = None
    RECIPE: ClassVar[tuple[str, ...]] = RECIPE_KEYS
    rows: ClassVar[int] = 1  # transformer rows per image in a step (fluxjax/plan/limits.py)

    @property
    def shape(self) -> tuple:
        """What a compiled batch depends on: jobs of one shape can share a batch (one pipeline
        call: its strength, resize policy, schedule and kinds of conditioning are per call)."""
        return (self.height, self.width, self.steps, self.guidance, self.image is not None, self.strength,
                self.mask is not None, self.resize, len(self.references), self.control is not None,
                self.true_cfg is not None, self.sigmas)

    def conditioning(self) -> dict:
        """This job's FluxPipeline conditioning keywords (only those it gives), for one image."""
        kw = dict(image=self.image, strength=self.strength, mask_image=self.mask, resize=self.resize,
                  reference_images=list(self.references) or None, control_image=self.control,
                  negative_prompt=self.negative_prompt, true_cfg_scale=self.true_cfg, prompt_2=self.prompt_2,
                  sigmas=None if self.sigmas is None else list(self.sigmas))
        return {k: v for k, v in kw.items() if v is not None}

    def text(self, model: str) -> dict[str, str]:
        """The PNG text chunks, as `fluxjax generate` writes them."""
        from fluxjax.images import conditioning_text

        text = png_text(self.prompt, self.seed, self.steps, self.guidance, self.width, self.height, model, self.loras)
        text.update(conditioning_text(**self.conditioning()))
        return text

    def make(self, pipe, padded: list["Job"]):
        """PIL images of `padded` (jobs of this job's shape) from `pipe`; with live LoRAs loaded,
        each image runs with its own strengths (`lora_table`); each its own image, mask and texts."""
        lora = {"lora_scales": lora_table(padded, [f for f, _ in pipe.loras])} if pipe.loras else {}
        cond = self.conditioning()
        per_image = {"image": "image", "mask_image": "mask", "control_image": "control",
                     "negative_prompt": "negative_prompt", "true_cfg_scale": "true_cfg"}
        for key, attr in per_image.items():
            if key in cond:
                cond[key] = [getattr(j, attr) for j in padded]
        if any(j.prompt_2 is not None for j in padded):  # prompt_2 defaults to the prompt, per image
            cond["prompt_2"] = [j.prompt if j.prompt_2 is None else j.prompt_2 for j in padded]
        if self.references:  # each image's list (Kontext), made at the line's size (resolve)
            cond["reference_images"] = [list(j.references) for j in padded]
            cond["max_area"] = self.height * self.width
        return pipe([j.prompt for j in padded], height=self.height, width=self.width, num_steps=self.steps,
                    guidance=self.guidance, seed=[j.seed for j in padded], output="pil", **lora, **cond)


EDIT_RECIPE_KEYS = ("method", "prompt", "source_prompt", "source_sha256", "resize", "seed", "steps", "n_max", "n_min",
                    "n_avg", "source_guidance", "target_guidance", "size", "model")


@dataclass(frozen=True)
class EditJob:
    """One FlowEdit of an image. `image` is an absolute path; `settings` a flowedit.EditSettings
    (unresolved until `resolve`); height and width the image's after the resize policy."""

    index: int
    where: str
    name: str
    image: str
    sha256: str
    source_prompt: str
    target_prompt: str
    seed: int
    height: int
    width: int
    settings: object
    resize: str | None = None
    RECIPE: ClassVar[tuple[str, ...]] = EDIT_RECIPE_KEYS

    @property
    def rows(self) -> int:
        """Transformer rows per image in an edit step: source and target, each of n_avg draws."""
        return 2 * (self.settings.n_avg or 1)

    @property
    def shape(self) -> tuple:
        return ("edit", self.height, self.width, self.resize, self.settings)

    def text(self, model: str) -> dict[str, str]:
        from fluxjax.images import edit_text

        return edit_text(os.path.basename(self.image), self.sha256, self.source_prompt, self.target_prompt, self.seed,
                         self.settings, self.width, self.height, model, self.resize)

    def make(self, pipe, padded: list["EditJob"]):
        s = self.settings
        return pipe.edit([j.image for j in padded], [j.source_prompt for j in padded], [j.target_prompt for j in padded],
                         num_steps=s.steps, n_max=s.n_max, n_min=s.n_min, n_avg=s.n_avg,
                         source_guidance=s.source_guidance, target_guidance=s.target_guidance,
                         seed=[j.seed for j in padded], resize=self.resize, output="pil")


def read_jobs(path: str, seed: int = 0, height: int | None = None, width: int | None = None,
              steps: int | None = None, guidance: float | None = None) -> list[Job]:
    """Parse and check a prompts file (text, or JSONL when it ends in .jsonl) into jobs.

    The keyword arguments are the defaults for what a line does not give (None: the model's).
    Raises UsageError "FILE:LINE: what is wrong" at the first bad line, before anything is written.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such prompts file")
    jsonl = path.lower().endswith(".jsonl")
    jobs: list[Job] = []
    names: dict[str, str] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            line = decode_line(raw, where)
            if not line.strip():
                continue
            fields = _jsonl_fields(line, where) if jsonl else {"prompt": line.strip()}
            k = len(jobs)
            if _is_edit(fields):
                job = _edit_job(fields, k, where, path, seed, steps)
                if job.name in names:
                    raise UsageError(f"{where}: name {job.name} is already used by {names[job.name]}")
                names[job.name] = where
                jobs.append(job)
                continue
            job = Job(index=k, where=where, name=_png_name(fields.get("name", f"{k:06d}"), where),
                      prompt=fields["prompt"], seed=fields.get("seed", seed + k), height=fields.get("height", height),
                      width=fields.get("width", width), steps=fields.get("steps", steps),
                      guidance=fields.get("guidance", guidance), loras=_loras(fields.get("loras", []), path, where))
            if CONDITIONING_KEYS & set(fields):
                job = _conditioned(job, fields, path)
            check_prompt(f"{where}: prompt", job.prompt)
            check_seed(f"{where}: seed", job.seed)
            if job.guidance is not None and not math.isfinite(job.guidance):
                raise UsageError(f"{where}: guidance must be a finite number, got {job.guidance}")
            if job.name in names:
                raise UsageError(f"{where}: name {job.name} is already used by {names[job.name]}")
            names[job.name] = where
            jobs.append(job)
    if not jobs:
        raise UsageError(f"{path}: no prompts in the file")
    edits = [j for j in jobs if isinstance(j, EditJob)]
    with_loras = [j for j in jobs if getattr(j, "loras", ())]
    if edits and with_loras:  # LoRAs run live for the whole run, and FlowEdit takes none
        raise UsageError(f"{with_loras[0].where}: loras cannot be used in a file with edit jobs ({edits[0].where})")
    return jobs


def _jsonl_fields(line: str, where: str) -> dict:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"{where}: expected a JSON object with a \"prompt\", got {type(fields).__name__}")
    if _is_edit(fields):
        return _edit_fields(fields, where)
    unknown = sorted(set(fields) - JSONL_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(JSONL_KEYS))})")
    if not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
        raise UsageError(f"{where}: missing \"prompt\" (a non-empty string)")
    for key in ("seed", "steps"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], int)):
            raise UsageError(f"{where}: {key} must be an integer, got {fields[key]!r}")
    if fields.get("steps", 1) < 1:
        raise UsageError(f"{where}: steps must be at least 1, got {fields['steps']}")
    for key in ("height", "width"):
        if key in fields:
            check_dimension(f"{where}: {key}", fields[key])
    if "guidance" in fields and (isinstance(fields["guidance"], bool) or not isinstance(fields["guidance"], (int, float))):
        raise UsageError(f"{where}: guidance must be a number, got {fields['guidance']!r}")
    if "guidance" in fields:
        fields["guidance"] = float(fields["guidance"])
    return fields


def _is_edit(fields: dict) -> bool:
    """An edit line (FlowEdit) names an image and no "prompt"; a line with a "prompt" and an
    "image" generates from that image (img2img, inpainting)."""
    return "image" in fields and "prompt" not in fields


def _conditioned(job: Job, fields: dict, path: str) -> Job:
    """`job` with the conditioning of its line: types checked, paths made absolute (relative to the
    prompts file's folder), the rest checked by conditioning.check_request; the size is the image's."""
    from fluxjax.pipeline.conditioning import check_request

    where = job.where
    folder = os.path.dirname(os.path.abspath(path))
    for key in ("image", "mask", "control", "resize", "negative_prompt", "prompt_2"):
        if key in fields and not isinstance(fields[key], str):
            raise UsageError(f"{where}: {key} must be a string, got {fields[key]!r}")
    for key in ("strength", "true_cfg"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], (int, float))):
            raise UsageError(f"{where}: {key} must be a number, got {fields[key]!r}")
    for key in ("references", "sigmas"):
        if key in fields and not isinstance(fields[key], list):
            raise UsageError(f"{where}: {key} must be a list, got {fields[key]!r}")
    if not all(isinstance(r, str) for r in fields.get("references", [])):
        raise UsageError(f"{where}: references must be a list of image paths, got {fields['references']!r}")
    if fields.get("resize") is not None and "image" in fields:
        from fluxjax.pipeline.conditioning import RESIZE_POLICIES

        if fields["resize"] not in RESIZE_POLICIES:
            raise UsageError(f"{where}: resize must be one of {', '.join(RESIZE_POLICIES)}, got {fields['resize']!r}")
    absolute = lambda p: None if p is None else os.path.join(folder, p)  # noqa: E731
    cond = dict(image=absolute(fields.get("image")), strength=fields.get("strength"), mask=absolute(fields.get("mask")),
                resize=fields.get("resize"), references=tuple(absolute(r) for r in fields.get("references", [])),
                control=absolute(fields.get("control")), negative_prompt=fields.get("negative_prompt"),
                true_cfg=fields.get("true_cfg"), prompt_2=fields.get("prompt_2"))
    height, width, sigmas = check_request(f"{where}: ", lambda key: key, **cond, sigmas=fields.get("sigmas"),
                                          steps=job.steps, height=job.height, width=job.width)
    return replace(job, **cond, height=height, width=width, sigmas=None if sigmas is None else tuple(sigmas),
                   steps=len(sigmas) if sigmas is not None else job.steps)


def _loras(value, path: str, where: str) -> tuple[tuple[str, float], ...]:
    from fluxjax.lora.adapters import check_strengths, parse_lora_arg

    if not isinstance(value, list):
        raise UsageError(f"{where}: loras must be a list of \"FILE[:SCALE]\" or [FILE, SCALE], got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            file, scale = parse_lora_arg(item, f"{where}: loras item")
        elif (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            file, scale = item[0], float(item[1])
            check_strengths(scale, f"{where}: loras item {item!r}")
        else:
            raise UsageError(f"{where}: loras item {item!r} is not \"FILE[:SCALE]\" or [FILE, SCALE]")
        file = os.path.abspath(os.path.join(os.path.dirname(path), file))
        if not os.path.isfile(file):
            raise UsageError(f"{where}: LoRA file {file} does not exist")
        out.append((file, scale))
    return tuple(out)


def lora_files(jobs: list[Job]) -> list[str]:
    """Every LoRA file the jobs name, in order of first appearance."""
    return list(dict.fromkeys(f for job in jobs for f, _ in getattr(job, "loras", ())))


def lora_table(jobs: list[Job], files: list[str]):
    """(len(jobs), len(files)) strengths: job i's strength of each file, 0 where it names none."""
    import numpy as np

    table = np.zeros((len(jobs), len(files)), np.float32)
    for i, job in enumerate(jobs):
        for f, w in job.loras:
            table[i, files.index(f)] += w
    return table


def _edit_fields(fields: dict, where: str) -> dict:
    """The checked fields of an edit line (its types; the settings' relations are checked by `_edit_job`)."""
    unknown = sorted(set(fields) - EDIT_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} for an edit (expected {', '.join(sorted(EDIT_KEYS))})")
    for key in ("image", "source_prompt", "target_prompt"):
        if not isinstance(fields.get(key), str) or not fields[key].strip():
            raise UsageError(f"{where}: missing \"{key}\" (a non-empty string)")
    for key in ("seed", "steps", "n_max", "n_min", "n_avg"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], int)):
            raise UsageError(f"{where}: {key} must be an integer, got {fields[key]!r}")
    for key in ("source_guidance", "target_guidance"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], (int, float))):
            raise UsageError(f"{where}: {key} must be a number, got {fields[key]!r}")
    return fields


def _edit_job(fields: dict, k: int, where: str, path: str, seed: int, steps: int | None) -> EditJob:
    """An EditJob from an edit line: the image found (relative to the JSONL file's folder), its size
    read from its header and its content hashed, the settings checked as far as they go without
    the model (`resolve` fills in its defaults)."""
    from fluxjax.pipeline.conditioning import image_size
    from fluxjax.sampling.flowedit import EditSettings

    image = os.path.join(os.path.dirname(os.path.abspath(path)), fields["image"])
    height, width = image_size(image, fields.get("resize"), f"{where}: image")
    with open(image, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    names = [f.name for f in dataclass_fields(EditSettings)]
    settings = EditSettings(**{n: fields.get(n) for n in names if n != "steps"}, steps=fields.get("steps", steps))
    try:  # with the largest defaults (dev's) where a value is missing: the model's are checked in `resolve`
        replace(settings, source_guidance=None, target_guidance=None).resolve("dev", False)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    job = EditJob(index=k, where=where, name=_png_name(fields.get("name", f"{k:06d}"), where), image=image, sha256=digest,
                  source_prompt=fields["source_prompt"], target_prompt=fields["target_prompt"],
                  seed=fields.get("seed", seed + k), height=height, width=width, settings=settings,
                  resize=fields.get("resize"))
    check_prompt(f"{where}: source_prompt", job.source_prompt)
    check_prompt(f"{where}: target_prompt", job.target_prompt)
    check_seed(f"{where}: seed", job.seed)
    return job


def _png_name(name, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"{where}: name must be a plain file name (no folders, not starting with '.'), got {name!r}")
    if name.startswith("manifest-"):
        raise UsageError(f"{where}: name {name!r}: names starting with 'manifest-' are kept for the manifests")
    if "\0" in name:  # no file name can hold one: open() would fail after the compute
        raise UsageError(f"{where}: name {name!r} holds a NUL character, which no file name can")
    name = name if name.lower().endswith(".png") else name + ".png"
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > LONGEST_NAME:  # refused now, not after the compute (OSError: File name too long)
        raise UsageError(f"{where}: name is {size} bytes long as a file name ({name[:20]}...); the most is "
                         f"{LONGEST_NAME} (255 less the temporary name's .NAME.PID.tmp)")
    return name


def resolve(jobs: list[Job], pipe) -> list[Job]:
    """Fill in the model's defaults (`pipe.settings`, `pipe.defaults` for the size); refuse
    guidance for models without it, naming the line."""
    out = []
    for job in jobs:
        if isinstance(job, EditJob):
            try:
                settings = job.settings.resolve(pipe.kind, pipe.transformer.model.config.guidance_embed)
            except UsageError as e:
                raise UsageError(f"{job.where}: {e}") from None
            out.append(replace(job, settings=settings))
            continue
        try:
            steps, guidance, _ = pipe.settings(job.steps, job.guidance)
        except UsageError as e:
            raise UsageError(f"{job.where}: {e}") from None
        out.append(replace(job, **dict(zip(("height", "width"), job_size(job, pipe.defaults))), steps=steps,
                           guidance=guidance))
    return out


def job_size(job: Job, defaults) -> tuple[int, int]:
    """(height, width) a prompt line makes: its own, else the model's `defaults`; with references
    (Kontext), as `fluxjax generate` makes it (conditioning.kontext_call_size)."""
    if job.references:
        from fluxjax.pipeline.conditioning import kontext_call_size

        return kontext_call_size(job.height, job.width, defaults.height, defaults.width)[:2]
    return job.height or defaults.height, job.width or defaults.width


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs grouped by shape (groups in order of first appearance), cut into runs of batch_size."""
    order = {}
    for job in jobs:
        order.setdefault(job.shape, len(order))
    ordered = sorted(jobs, key=lambda j: (order[j.shape], j.index))
    out = []
    for _, group in groupby(ordered, key=lambda j: j.shape):
        group = list(group)
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


# --- manifests -----------------------------------------------------------------------------

def manifest_path(out_dir: str, host: int) -> str:
    return os.path.join(out_dir, f"manifest-{host:05d}.jsonl")


def read_manifests(out_dir: str) -> dict[str, dict]:
    """name -> record from every host's manifest in out_dir. A last line without its newline (a
    process killed while appending it) is not a record: its image counts as not done."""
    done: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "manifest-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines[:-1], 1):
            try:
                record = json.loads(line)
                done.setdefault(record["name"], record)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{number}: not a manifest record (a JSON object with a \"name\")") from None
    return done


class Manifest:
    """This host's manifest: one JSON object a line, each appended and fsynced on its own."""

    def __init__(self, path: str):
        _drop_unfinished_line(path)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _drop_unfinished_line(path: str) -> None:
    """Cut a line left half-written by a killed process, so the next record starts on its own line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def run_settings(batch_size: int, dtype, sharding: str | None, devices, quantize: str | None = None) -> dict[str, str]:
    """The RUN_KEYS of a run, as the manifest records them.

    dtype: the pipeline's ("bfloat16", "float32"); sharding: the strategy's name or None;
    devices: those its mesh spans (one device without a strategy); quantize: the pipeline's
    weight quantization ("int8", "fp8" or None).
    """
    import jax
    import numpy as np

    devices = list(devices)
    return {"batch_size": str(batch_size), "dtype": np.dtype(dtype).name, "sharding": sharding or "none",
            "devices": f"{len(devices)} x {devices[0].device_kind}", "jax": jax.__version__,
            "quantize": quantize or "none"}


def pipeline_settings(pipe, batch_size: int) -> dict[str, str]:
    """`run_settings` of a run with `pipe` (a FluxPipeline)."""
    import jax

    devices = pipe.mesh.devices.flat if pipe.mesh is not None else jax.local_devices()[:1]
    return run_settings(batch_size, pipe.transformer.model.dtype, pipe.strategy.name if pipe.strategy else None, devices,
                        pipe.transformer.model.quantize)


def check_settings(done: dict[str, dict], settings: dict[str, str]) -> None:
    """Refuse to add images to a folder whose recorded images were made with other RUN_KEYS:
    the same job would give other pixels, so the folder would mix two runs' images."""
    for name, record in done.items():
        differ = [k for k in RUN_KEYS if record.get(k, RUN_KEY_BEFORE.get(k)) != settings[k]]
        if differ:
            k = differ[0]
            raise UsageError(f"{name} in the output folder was made with {k} {record.get(k)!r}, this run's is "
                             f"{settings[k]!r}; an image's pixels depend on it, so resume with the same settings "
                             "or use a new --out-dir")


def check_recipes(jobs: list[Job], done: dict[str, dict], model: str) -> None:
    """Refuse to run when an image recorded under a job's name was made from another recipe."""
    for job in jobs:
        record = done.get(job.name)
        if record is None:
            continue
        wanted = job.text(model)
        differ = [k for k in job.RECIPE if record.get(k) != wanted.get(k)]
        if differ:
            raise UsageError(f"{job.where}: {job.name} is already recorded in the output folder with another "
                             f"{differ[0]} ({record.get(differ[0])!r}, now {wanted.get(differ[0])!r}); "
                             "use a new --out-dir or remove that image's manifest line")


# --- the run -------------------------------------------------------------------------------

@dataclass
class Summary:
    """What one host did. `redone`: images found on disk but not recorded, generated again."""

    host: int
    hosts: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    redone: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        who = f"host {self.host} of {self.hosts}: " if self.hosts > 1 else ""
        redone = f" ({self.redone} found unrecorded and made again)" if self.redone else ""
        return (f"{who}{self.done} done{redone}, {self.skipped} skipped as already done, {self.failed} failed, "
                f"in {self.seconds:.1f} s, {rate:.2f} images/s")


def generate(pipe, jobs: list[Job], out_dir: str, batch_size: int, host: int = 0, hosts: int = 1,
             log=None) -> Summary:
    """Make this host's share of `jobs` (resolved) in out_dir, skipping those already recorded.

    pipe: a FluxPipeline. A batch that fails (e.g. out of memory) is reported on `log` (default
    sys.stderr) and counted in Summary.failed; the run goes on with the next batch, and a later
    run retries it.
    """
    from tqdm import tqdm

    log = log or sys.stderr

    start = time.perf_counter()
    done = read_manifests(out_dir)
    check_recipes(jobs, done, pipe.name)
    mine = [job for job in jobs if job.index % hosts == host]
    todo = [job for job in mine if job.name not in done]
    settings = pipeline_settings(pipe, batch_size)
    if todo:  # with nothing left to make, other settings change nothing
        check_settings(done, settings)
    summary = Summary(host=host, hosts=hosts, skipped=len(mine) - len(todo))
    summary.redone = sum(os.path.exists(os.path.join(out_dir, job.name)) for job in todo)
    for job in todo:  # this host is the only writer of its jobs' files
        remove_temporaries(out_dir, job.name, any_process=True, log=log)

    manifest = Manifest(manifest_path(out_dir, host))
    tty = getattr(log, "isatty", lambda: False)()
    bar = tqdm(total=len(todo), unit="img", desc=f"host {host}/{hosts}" if hosts > 1 else "images", file=log,
               mininterval=0.5 if tty else 30.0, dynamic_ncols=True)
    try:
        for batch in batches(todo, batch_size):
            padded = batch + [batch[-1]] * (batch_size - len(batch))
            first = batch[0]
            try:
                images = first.make(pipe, padded)
                records = [_save(image, job, out_dir, pipe.name, host, settings) for job, image in zip(batch, images)]
                fsync_dir(out_dir)  # the renames are durable before the manifest says so
                for record in records:
                    manifest.append(record)
                summary.done += len(batch)
            except UsageError:
                raise
            except Exception as e:  # one bad batch (out of memory, disk full) should not end a day-long run
                summary.failed += len(batch)
                message = " ".join(str(e).split())[:300]
                print(f"fluxjax batch: {len(batch)} images failed ({first.name} ...): {type(e).__name__}: {message}",
                      file=log, flush=True)
            bar.update(len(batch))
    finally:
        bar.close()
        manifest.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _save(image, job: Job, out_dir: str, model: str, host: int, settings: dict[str, str]) -> dict:
    """Write one PNG atomically and durably; return its manifest record (with the run's settings)."""
    path = os.path.join(out_dir, job.name)
    text = job.text(model)
    save_png(image, path, text)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
        os.fsync(f.fileno())
    return {"name": job.name, "index": job.index, **text, **settings, "sha256": digest, "host": host, "time": time.time()}
