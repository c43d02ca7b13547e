"""What `pipe(...)` uses for an argument left at None: each model kind's defaults (dev, schnell,
tiny; FLUX.1-Fill-dev's own), replaced key by key by a pipeline folder's defaults.json."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from fluxjax.errors import UsageError
from fluxjax.sampling import sampler as sampling

DEFAULTS_FILE = "defaults.json"  # a pipeline folder's own defaults (see folder_defaults)


@dataclass(frozen=True)
class Defaults:
    """What `pipe(...)` uses for an argument left at None."""

    num_steps: int
    guidance: float | None
    max_sequence_length: int
    height: int = 1024
    width: int = 1024


# dev vs schnell is read from the checkpoint: a guidance embedding means a guidance-distilled
# (dev-like) model. The tiny preset is sized for a CPU smoke test.
DEFAULTS = {
    "dev": Defaults(num_steps=28, guidance=3.5, max_sequence_length=512),
    "schnell": Defaults(num_steps=4, guidance=None, max_sequence_length=256),
    "tiny": Defaults(num_steps=4, guidance=3.5, max_sequence_length=64, height=256, width=256),
}
# FLUX.1-Fill-dev's own defaults (diffusers' FluxFillPipeline): more steps, a much higher guidance.
FILL_DEFAULTS = Defaults(num_steps=50, guidance=30.0, max_sequence_length=512)


def kind_defaults(kind: str, variant: str = "base") -> Defaults:
    """The defaults of a model of `kind` ("dev", "schnell", "tiny") and `variant` (a Fill dev model has its own)."""
    return FILL_DEFAULTS if variant == "fill" and kind == "dev" else DEFAULTS[kind]


def kind_schedule(kind: str) -> sampling.Schedule:
    """The schedule of a model of `kind` whose folder has no scheduler_config.json."""
    return sampling.Schedule.schnell() if kind == "schnell" else sampling.Schedule.dev()


def folder_defaults(folder: str, guidance_embed: bool) -> Defaults:
    """The defaults of a pipeline loaded from `folder` whose transformer has (or lacks) a
    guidance embedding: FLUX.1-dev's (or -schnell's), replaced key by key by those of
    folder/defaults.json when there is one: a JSON object with any of "height", "width"
    (multiples of 16), "num_steps", "max_sequence_length" (integers >= 1) and "guidance" (a
    number; null for a model without a guidance embedding). A packaged model states there the
    settings at which it was measured. UsageError naming the file and key otherwise."""
    return with_overrides(folder, read_defaults(folder), guidance_embed)


def read_defaults(folder: str) -> dict:
    """folder/defaults.json's settings, checked key by key ({} when there is no such file)."""
    path = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    keys = [f.name for f in dataclasses.fields(Defaults)]
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a JSON object with keys among {', '.join(keys)}")
    for key, value in values.items():
        if key not in keys:
            raise UsageError(f"{path}: unknown key {key!r} (expected any of {', '.join(keys)})")
        if key in ("height", "width"):
            sampling.check_dimension(f"{path}: {key}", value)
        elif key == "guidance":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not np.isfinite(value)):
                raise UsageError(f"{path}: guidance must be a finite number or null, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{path}: {key} must be an integer >= 1, got {value!r}")
    return {k: float(v) if k == "guidance" and v is not None else v for k, v in values.items()}


def with_overrides(folder: str, overrides: dict, guidance_embed: bool, base: Defaults | None = None) -> Defaults:
    """`base` (default: the kind's defaults) replaced by `overrides` (from read_defaults), the
    guidance checked against the transformer."""
    base = DEFAULTS["dev" if guidance_embed else "schnell"] if base is None else base
    defaults = dataclasses.replace(base, **overrides)
    path = os.path.join(folder, DEFAULTS_FILE)
    if defaults.guidance is not None and not guidance_embed:
        raise UsageError(f"{path}: guidance {defaults.guidance} for a transformer without a guidance embedding "
                         "(set it to null)")
    if defaults.guidance is None and guidance_embed:
        raise UsageError(f"{path}: guidance null for a transformer with a guidance embedding (give a number)")
    return defaults


def resolve_settings(defaults: Defaults, guidance_embed: bool, name: str, num_steps: int | None = None,
             guidance: float | None = None, max_sequence_length: int | None = None) -> tuple[int, float | None, int]:
    """(num_steps, guidance, max_sequence_length) of a call with these arguments: None filled in
    from `defaults`; guidance None for a model without a guidance embedding, which refuses one
    given (UsageError naming the model as `name`)."""
    num_steps = defaults.num_steps if num_steps is None else num_steps
    max_sequence_length = defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    if not guidance_embed:
        if guidance is not None:
            raise UsageError(f"{name} has no guidance embedding: leave guidance unset")
        return num_steps, None, max_sequence_length
    guidance = defaults.guidance if guidance is None else guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not np.isfinite(guidance):
        raise UsageError(f"guidance must be a finite number, got {guidance!r}")
    return num_steps, float(guidance), max_sequence_length
