"""Image files that are damaged or unusual, made in a test's folder: what users hand fluxjax
(issue 31: truncated, corrupt, decompression bombs, FIFOs, 16-bit, EXIF-rotated)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# A bomb without writing 400 megapixels: tests lower PIL's limit to this, so any image of more
# than twice as many pixels (the 32 x 48 "ok") is refused as PIL refuses a 20000 x 20000 PNG.
BOMB_LIMIT = 500


def make(folder, height: int = 32, width: int = 48) -> dict[str, str]:
    """{"ok", "trunc", "corrupt", "fifo", "g16", "exif6"}: paths of files in `folder`.

    ok: a random RGB PNG of height x width; trunc: its first half (the header intact); corrupt:
    bytes of no image format; fifo: a FIFO named .png; g16: a 16-bit grayscale gradient (I;16)
    of height x width, 0 to 65535 left to right; exif6: a JPEG stored width x height (sideways)
    with EXIF orientation 6, which viewers show height x width.
    """
    os.makedirs(folder, exist_ok=True)
    path = {k: os.path.join(folder, f"{k}.{'jpg' if k == 'exif6' else 'png'}") for k in
            ("ok", "trunc", "corrupt", "fifo", "g16", "exif6")}
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path["ok"])
    data = open(path["ok"], "rb").read()
    with open(path["trunc"], "wb") as f:
        f.write(data[:len(data) // 2])
    with open(path["corrupt"], "wb") as f:
        f.write(b"not an image at all")
    os.mkfifo(path["fifo"])
    Image.fromarray(np.tile(gradient16(width), (height, 1))).save(path["g16"])
    sideways = Image.new("RGB", (height, width), (200, 30, 30))
    exif = sideways.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways.save(path["exif6"], exif=exif.tobytes())
    return path


def gradient16(width: int) -> np.ndarray:
    """(width,) uint16 from 0 to 65535."""
    return np.linspace(0, 65535, width).round().astype(np.uint16)
