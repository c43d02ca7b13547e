"""Image files: read as people see them, and PNGs written as fluxjax writes them (the recipe in
text chunks, written atomically, the temporary files of a killed writer cleaned up by the next one).

Reading (`read_image`) is the one reader of every input image: generate's and edit's images,
masks, references and control images, batch's, and training's. It decodes the whole file (a
truncated one fails at once, naming it, not after minutes of loading), applies the EXIF
orientation (a phone's JPEG is stored sideways with an orientation tag; viewers, and diffusers'
load_image, turn it upright), and brings every mode to 8-bit RGB by its range (`rgb8`).

Writing: used by `fluxjax generate` and `fluxjax batch` alike, so a PNG says the same about itself
whichever wrote it. A PNG is written as ".NAME.PID.tmp" beside NAME and renamed: NAME is either
complete or absent. A process killed during the write (SIGKILL, power) leaves that hidden
temporary file; `remove_temporaries` is what the next run calls to remove it.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import warnings

from fluxjax.errors import UsageError, check_regular_file

TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")  # ".NAME.PID.tmp"
# The longest PNG name (in UTF-8 bytes) whose temporary ".NAME.PID.tmp" fits the 255 bytes a file
# name has on Linux's file systems: a pid has at most 7 digits (pid_max is at most 4194304).
LONGEST_NAME = 255 - len("..4194304.tmp")


def read_image(path: str | os.PathLike, name: str = "image"):
    """The image file at `path` as a PIL image in 8-bit RGB, decoded in full, EXIF orientation applied.

    UsageError naming "NAME PATH" (PATH alone when name is "") in one line for a missing file, one
    that is not a regular file (a FIFO would block the open forever), and one PIL cannot decode:
    not an image, truncated, a decompression bomb (more than twice PIL's MAX_IMAGE_PIXELS; between
    once and twice it only warns, and a 100-megapixel photo is a fair input, so that warning is
    silenced).
    """
    from PIL import Image, ImageOps

    check_regular_file(path, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # the whole file: a truncated one fails here
                return rgb8(ImageOps.exif_transpose(im))
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, ValueError, ...)
        label = f"{name} {os.fspath(path)}" if name else os.fspath(path)
        raise UsageError(f"{label}: unreadable image ({type(e).__name__}: {e})") from None


def rgb8(image):
    """A PIL image of any mode as 8-bit RGB, each mode scaled by its range, not clipped to 0..255
    as PIL's convert("RGB") clips: 16-bit and 32-bit integers ("I;16*", "I": a 16-bit PNG's
    0..65535) divided by 257, floats ("F") taken as 0..1. Alpha is dropped (the colour under it
    kept), as diffusers' load_image does; a palette with transparency goes through RGBA, which
    PIL asks for."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, np.float64)
        top, scale = (1.0, 255.0) if image.mode == "F" else (65535.0, 1 / 257)
        gray = np.round(np.clip(np.nan_to_num(values), 0.0, top) * scale).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's content."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def edit_text(source_image: str, source_sha256: str, source_prompt: str, target_prompt: str, seed: int,
              settings, width: int, height: int, model: str, resize: str | None = None) -> dict[str, str]:
    """The text chunks of a FlowEdit result (fluxjax/sampling/flowedit.py): what was edited and how.

    source_image: the source file's name; source_sha256: its content's digest (the name alone
    does not say which image it was); settings: a resolved flowedit.EditSettings; resize: the
    policy that brought the source to a multiple of 16 (None: it was one). "prompt" is
    the target prompt (what the image now shows), as in a generated image's chunks.
    """
    def guidance(g):
        return "none" if g is None else f"{g:g}"

    return {"method": "flowedit", "prompt": target_prompt, "source_prompt": source_prompt,
            "source_image": source_image, "source_sha256": source_sha256, "resize": resize or "none",
            "seed": str(seed),
            "steps": str(settings.steps), "n_max": str(settings.n_max), "n_min": str(settings.n_min),
            "n_avg": str(settings.n_avg), "source_guidance": guidance(settings.source_guidance),
            "target_guidance": guidance(settings.target_guidance), "size": f"{width}x{height}", "model": model,
            "software": "fluxjax"}


def temporary_path(path: str) -> str:
    """Where `save_png` writes `path` before renaming it: ".NAME.PID.tmp" in the same folder."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def save_png(image, path: str, text: dict[str, str]) -> None:
    """Write `image` (PIL) to `path` with `text` as PNG text chunks, atomically (temp name, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)  # iTXt: UTF-8, so any prompt survives
    tmp = temporary_path(path)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(folder: str, name: str, any_process: bool = False, log=None) -> list[str]:
    """Remove the temporary files `save_png` left for `folder`/`name` when its writer was killed,
    saying so on `log` (default sys.stderr); returns their paths.

    any_process: remove every one (the caller is the only writer of `name`, as a batch host is of
    its jobs); otherwise only those whose process is gone, so a concurrent writer keeps its own.
    """
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}.") + "*.tmp"))):
        match = TEMPORARY.fullmatch(os.path.basename(path))
        if match is None or match["name"] != name:
            continue
        if any_process or not process_alive(int(match["pid"])):
            os.remove(path)
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} unfinished PNG temporary file(s) left by an interrupted run: "
              + ", ".join(removed), file=log or sys.stderr, flush=True)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (the writer of a temporary or staging file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fsync_dir(folder: str) -> None:
    """Make the renames in `folder` durable (a rename is an entry of its folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
