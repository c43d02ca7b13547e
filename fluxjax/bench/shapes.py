"""Accuracy of a `shapes` model (fluxjax/shapes/recipe.py) through the real FluxPipeline.

For a fixed prompt list (`prompt_list`: every held-out combination of fluxjax.shapes.dataset and as many
seen ones, spread evenly, each at every position, centred included), generate with
`FluxPipeline.from_pretrained(model)` at the settings of the model's defaults.json, grade every
image with `shapes.classify`, and print the accuracy per attribute for seen and held-out
prompts, and images/s (after one warm-up batch that compiles).

    fluxjax bench shapes [--model fluxjax/shapes/weights] [--combos N] [--grid grid.png] [--quantize int8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from fluxjax.shapes import dataset as shapes
from fluxjax.bench.common import record

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "shapes", "weights")
DEFAULTS_FILE = "defaults.json"


def load_defaults(model: str) -> dict:
    """The model folder's defaults.json: height, width, num_steps, guidance, max_sequence_length."""
    path = os.path.join(model, DEFAULTS_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file (a shapes model folder holds the settings it is measured at)") from None


def prompt_list(combos: int | None = None) -> list[str]:
    """Held-out prompts, then seen ones: `combos` (default all 24) held-out combinations and as
    many seen ones spread evenly over the sorted SEEN, each at every position (centred first)."""
    held = sorted(shapes.HELD_OUT)
    seen = sorted(shapes.SEEN)
    n = len(held) if combos is None else min(combos, len(held))
    picks = [held[round(i * len(held) / n)] for i in range(n)] + [seen[round(i * len(seen) / n)] for i in range(n)]
    return [shapes.Caption(*combo, p).text for combo in picks for p in (shapes.CENTER, *shapes.POSITIONS)]


def generate(pipe, prompts: list[str], defaults: dict, seed: int = 0, batch: int = 40) -> np.ndarray:
    """uint8 images (N, H, W, 3) of `prompts` at `defaults`; prompt i gets seed `seed + i`."""
    from fluxjax.pipeline.pipeline import to_uint8

    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out.append(to_uint8(pipe(chunk, height=defaults["height"], width=defaults["width"],
                                 num_steps=defaults["num_steps"], guidance=defaults["guidance"],
                                 max_sequence_length=defaults["max_sequence_length"], seed=seed + start,
                                 output="np")))
    return np.concatenate(out)


def grade(images: np.ndarray, prompts: list[str]) -> dict[str, dict[str, float]]:
    """{"seen": accuracy, "held-out": accuracy} (each `shapes.accuracy`: attribute -> fraction right)."""
    results = [shapes.classify(im, p) for im, p in zip(images, prompts)]
    groups = {"seen": [r for r, p in zip(results, prompts) if not shapes.is_held_out(p)],
              "held-out": [r for r, p in zip(results, prompts) if shapes.is_held_out(p)]}
    return {name: shapes.accuracy(rs) for name, rs in groups.items() if rs}


def evaluate(model: str = DEFAULT_MODEL, combos: int | None = None, seed: int = 0, batch: int = 40,
             quantize: str | None = None):
    """Load `model` (its transformer's and T5's Linears `quantize`d: None, "int8" or "fp8"),
    generate `prompt_list(combos)`, grade. Returns (accuracy as `grade` gives it, images (N, H, W, 3)
    uint8, prompts, images/s of the timed generation)."""
    from fluxjax.pipeline.pipeline import FluxPipeline

    defaults = load_defaults(model)
    pipe = FluxPipeline.from_pretrained(model, quantize=quantize)
    prompts = prompt_list(combos)
    batch = min(batch, len(prompts))
    generate(pipe, prompts[:batch], defaults, seed, batch)  # compiles
    start = time.perf_counter()
    images = generate(pipe, prompts, defaults, seed, batch)
    rate = len(prompts) / (time.perf_counter() - start)
    return grade(images, prompts), images, prompts, rate


def save_grid(images: np.ndarray, path: str, columns: int = 10, gap: int = 2) -> None:
    """The images (N, H, W, 3) uint8 as one PNG, `columns` wide, separated by grey gaps (64 colours)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 128, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
    # a 64-colour palette: the images are nearly flat colours, and the PNG is a sixth of the size
    Image.fromarray(grid).quantize(64).save(path, optimize=True)


def table(accuracy: dict[str, dict[str, float]]) -> str:
    names = list(accuracy)
    lines = ["attribute   " + "  ".join(f"{n:>9}" for n in names)]
    for attribute in (*shapes.ATTRIBUTES, "all"):
        lines.append(f"{attribute:<12}" + "  ".join(f"{100 * accuracy[n][attribute]:8.1f}%" for n in names))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a shapes model folder (default: the shipped one)")
    parser.add_argument("--combos", type=int, default=None,
                        help="held-out and seen combinations each (default all 24 held-out, 24 seen), 5 positions each")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i")
    parser.add_argument("--batch", type=int, default=40, help="images per pipeline call")
    parser.add_argument("--quantize", default=None, choices=("int8", "fp8"),
                        help="the model's transformer and T5 Linears weight-only int8 or fp8 (docs/quantization.md)")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also save every generated image as one grid")
    args = parser.parse_args(argv)

    accuracy, images, prompts, rate = evaluate(args.model, args.combos, args.seed, args.batch, args.quantize)
    d = load_defaults(args.model)
    print(f"{args.model}: {len(prompts)} prompts at {d['width']}x{d['height']}, {d['num_steps']} steps, "
          f"{args.quantize or 'bf16'} weights")
    print(table(accuracy))
    print(f"{rate:.1f} images/s")
    for group, acc in accuracy.items():
        for attribute, value in acc.items():
            record(f"{group} {attribute}", 100 * value, unit="%")
    record("generation", rate, unit="images/s")
    if args.grid:
        save_grid(images, args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
