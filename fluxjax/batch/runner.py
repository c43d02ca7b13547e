"""Batch generation: many prompts to PNGs in a folder, split over hosts, resumable.

Jobs. A prompts file is text (one prompt a line) or JSONL (`.jsonl`: one object a line with
"prompt" and the optional keys of fluxjax/pipeline/request.py's table, those of `fluxjax generate`'s
flags and "name" (paths relative to the JSONL file's folder; the PNG records the inputs'
SHA-256)); blank lines are skipped. A JSONL line with "image" and no "prompt" is an edit job
(FlowEdit, fluxjax/sampling/flowedit.py): "image" (a path, relative to the JSONL file's folder),
"source_prompt", "target_prompt" and the table's other optional edit keys; its size is the
image's, and its recipe includes the image's SHA-256 (edits take no LoRAs). Job k
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
import os
import sys
import time
from dataclasses import dataclass, fields as dataclass_fields, replace
from typing import Any, ClassVar, Mapping
from itertools import groupby

from fluxjax.pipeline import request
from fluxjax.errors import UsageError
from fluxjax.images import LONGEST_NAME, fsync_dir, remove_temporaries, save_png
from fluxjax.pipeline.text import decode_line

# What else an image's pixels depend on (measured: docs/usage.md, "Many prompts"), recorded with every
# image in the manifest; a resume that would change one of them is refused.
RUN_KEYS = ("batch_size", "dtype", "sharding", "devices", "jax", "quantize")
# A RUN_KEY that manifests written before it existed lack, with the value those runs had.
RUN_KEY_BEFORE = {"quantize": "none"}


@dataclass(frozen=True)
class Job:
    """One image to make. `where` is "FILE:LINE" of its prompt, for error messages.

    values: the line's options (fluxjax/pipeline/request.py: {name: value}, those given or defaulted,
    checked; paths absolute), read as attributes: job.prompt, job.height, job.references (()
    when not given, None for the others). height, width, steps, guidance are None until
    `resolve` fills in the model's defaults; guidance stays None for models without a guidance
    embedding.
    """

    index: int
    where: str
    name: str
    values: Mapping[str, Any]
    RECIPE: ClassVar[tuple[str, ...]] = request.RECIPE_KEYS
    rows: ClassVar[int] = 1  # transformer rows per image in a step (fluxjax/plan/limits.py)

    def __getattr__(self, key: str):
        option = request.BY_NAME.get(key)
        if option is None:
            raise AttributeError(key)
        return self.__dict__.get("values", {}).get(key, option.default if option.type in ("files", "loras") else None)

    @property
    def shape(self) -> tuple:
        """What a compiled batch depends on: jobs of one shape can share a batch (one pipeline
        call: its strength, resize policy, schedule and kinds of conditioning are per call)."""
        return request.batch_shape(self.values)

    def text(self, model: str) -> dict[str, str]:
        """The PNG text chunks, as `fluxjax generate` writes them."""
        return request.recipe_text(self.values, self.width, self.height, model)

    def make(self, pipe, padded: list["Job"]):
        """PIL images of `padded` (jobs of this job's shape) from `pipe`; with live LoRAs loaded,
        each image runs with its own strengths (`lora_table`); each its own image, mask and texts."""
        extra = {"lora_scales": lora_table(padded, [f for f, _ in pipe.loras])} if pipe.loras else {}
        if self.references:  # each image's list (Kontext), made at the line's size (resolve)
            extra["max_area"] = self.height * self.width
        kw = request.batch_keywords([j.values for j in padded])
        return pipe(kw.pop("prompt"), output="pil", **kw, **extra)


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


def read_jobs(path: str, seed: int = 0, **defaults) -> list[Job]:
    """Parse and check a prompts file (text, or JSONL when it ends in .jsonl) into jobs.

    seed: line k's is seed + k. defaults: request options (fluxjax/pipeline/request.py: height, width,
    steps, guidance, ...) for what a line does not give (None: the model's).
    Raises UsageError "FILE:LINE: what is wrong" at the first bad line, before anything is written.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such prompts file")
    jsonl = path.lower().endswith(".jsonl")
    folder = os.path.dirname(os.path.abspath(path))
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
                job = _edit_job(fields, k, where, path, seed, defaults.get("steps"))
            else:
                name = _png_name(fields.pop("name", f"{k:06d}"), where)
                loras = _loras(fields.pop("loras", []), path, where)
                values = {**defaults, "seed": seed + k, **request.absolute_paths(fields, folder), "loras": loras}
                values = request.check(values, "generate", f"{where}: ")
                if "sigmas" in values:  # the schedule sets the step count
                    values["steps"] = len(values["sigmas"])
                job = Job(index=k, where=where, name=name, values=values)
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
    return request.parse_line(fields, "edit" if _is_edit(fields) else "generate", where)


def _is_edit(fields: dict) -> bool:
    """An edit line (FlowEdit) names an image and no "prompt"; a line with a "prompt" and an
    "image" generates from that image (img2img, inpainting)."""
    return "image" in fields and "prompt" not in fields


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


def _edit_job(fields: dict, k: int, where: str, path: str, seed: int, steps: int | None) -> EditJob:
    """An EditJob from an edit line: the image found (relative to the JSONL file's folder), its size
    read from its header and its content hashed, the settings checked as far as they go without
    the model (`resolve` fills in its defaults)."""
    from fluxjax.pipeline.conditioning import image_size
    from fluxjax.sampling.flowedit import EditSettings

    request.check({k: fields.get(k) for k in request.keys("edit")} | {"seed": fields.get("seed", seed + k)}, "edit",
                  f"{where}: ")
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
        height, width = job_size(job, pipe.defaults)
        out.append(replace(job, values={**job.values, "height": height, "width": width, "steps": steps,
                                        "guidance": guidance}))
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
