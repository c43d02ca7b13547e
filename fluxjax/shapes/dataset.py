"""Shapes: a procedural captioned-image toy dataset, and the classifier that grades images of it.

Captions follow one grammar (`GRAMMAR`):

    a {color} {shape} on a {color} background[ in the {position}]

with the colours of `PALETTE` (eight, far apart in RGB), the shapes of `SHAPES` (circle, square,
triangle) and the positions of `POSITIONS` (left, right, top, bottom); no position means the
shape is centred (`CENTER`). The shape and background colours always differ. The article is
written "an" before a vowel ("an orange square ..."); `parse` accepts "a" or "an" anywhere.

Drawing (`draw`): a flat background and one flat, axis-aligned shape, anti-aliased (each pixel
is the mean of 4x4 samples, so edges blend the two colours). All geometry is in fractions of
the image side, so one seed gives the same picture at every size. The shape's bounding box is
a square of side `SHAPE_SIDE` (drawn uniformly: 23-26 px at 64 px, 46-51 px at 128 px, large
enough that a 64-128 px model sees its geometry) whose centre is its region's centre moved by
up to `JITTER` on each axis. A region (`REGIONS`) is the half-side square around that centre:
left is x in [0, 0.5], y in [0.25, 0.75]; centred is [0.25, 0.75] on both axes. The box never
leaves its region. A circle fills the box's inscribed disc, a square the box, a triangle points
up with its base on the box's bottom edge and its apex at the middle of the top edge.

Held-out combinations (`HELD_OUT`, `SEEN`, `split_combinations`): of the 168 (color, shape,
background) combinations, those with (i_color + 2 i_background + 3 i_shape) mod 7 == 0, the
indices counted in `PALETTE` and `SHAPES` order, are held out from training: 24 (14%), eight
per shape. Every (color, shape), (color, background) and (shape, background) pair stays in
`SEEN`, and for 22 of the 24 the combination with the two colours swapped is seen, so held-out
accuracy measures whether a model binds each colour to its role rather than remembers triples.

Classifying (`classify`, `accuracy`): the grader of generated images. Given an RGB image and
the caption it was asked for, it predicts the shape colour (the nearest `PALETTE` colour of the
median of a small patch at the caption's region centre), the background colour (the same for
the corners away from that region), the position (the region centre nearest to the centroid of
the shape-coloured pixels) and the shape (the fill ratio of those pixels in their bounding box:
square 1, circle pi/4, triangle 1/2). "Shape-coloured" means nearer the predicted shape colour
than the predicted background colour, and only the largest 4-connected region of such pixels
counts, so stray specks do not move the centroid or stretch the box. A shape drawn away from
its named position therefore also gets its colour wrong: the patch at the named position shows
background, and then no shape is found (shape and position None).

Everything here is numpy; nothing needs JAX.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Iterable, Iterator

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 128, 0),
    "purple": (128, 0, 128),
}  # closest pair: orange and yellow, 127 apart (half the range), so 63 of noise per pixel is tolerated
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
CENTER = "center"  # the position of a caption without " in the {position}"
GRAMMAR = "a {color} {shape} on a {color} background[ in the {position}]"
ATTRIBUTES = ("color", "shape", "background", "position")  # what `classify` predicts and grades

SHAPE_SIDE = (0.36, 0.40)  # the bounding box's side, a fraction of the image side, drawn uniformly
JITTER = 0.02  # the box centre moves at most this far from its region's centre, on each axis
REGION_CENTERS = {CENTER: (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
                  "bottom": (0.5, 0.75)}  # (x, y), fractions of the width and height
REGIONS = {p: (x - 0.25, y - 0.25, x + 0.25, y + 0.25) for p, (x, y) in REGION_CENTERS.items()}  # (x0, y0, x1, y1)
FILL_RATIOS = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # shape area / bounding-box area
MIN_SIZE = 16  # the smallest image side `draw` and `classify` take (see `classify` for how small is exact)

_SUPERSAMPLE = 4  # anti-aliasing: samples per pixel along each axis
_COLOR_PATCH = 0.03  # half-side of the patch read for the shape colour; inside every shape for any jitter
_CORNER_PATCH = 0.1  # side of each corner patch read for the background colour
_CORNERS_AWAY = {CENTER: ("tl", "tr", "bl", "br"), "left": ("tr", "br"), "right": ("tl", "bl"),
                 "top": ("bl", "br"), "bottom": ("tl", "tr")}
_CAPTION_RE = re.compile(r"an? (\w+) (\w+) on an? (\w+) background(?: in the (\w+))?")


def _grammar_error(what: str) -> ValueError:
    return ValueError(
        f"{what} is not in the shapes grammar '{GRAMMAR}' (color: {', '.join(PALETTE)}; shape: "
        f"{', '.join(SHAPES)}; position: {', '.join(POSITIONS)} or none for centred; the two colours differ)")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption's attributes; `position` is one of `POSITIONS` or `CENTER`.

    Constructing one checks it against the grammar (ValueError otherwise); `text` is the caption.
    """

    color: str
    shape: str
    background: str
    position: str = CENTER

    def __post_init__(self):
        if (self.color not in PALETTE or self.background not in PALETTE or self.shape not in SHAPES
                or self.position not in REGION_CENTERS or self.color == self.background):
            raise _grammar_error(repr(self))

    @property
    def text(self) -> str:
        where = "" if self.position == CENTER else f" in the {self.position}"
        return (f"{_article(self.color)} {self.color} {self.shape} on "
                f"{_article(self.background)} {self.background} background{where}")

    @property
    def combination(self) -> tuple[str, str, str]:
        """(color, shape, background): the unit of the seen / held-out split."""
        return (self.color, self.shape, self.background)


def normalize(prompt: str) -> str:
    """A prompt as this grammar's captions are written: lower case, single spaces, no final
    punctuation ("A RED CIRCLE  ON A BLUE BACKGROUND." -> "a red circle on a blue background").
    `parse` reads a caption so, and the shapes model's tokenizers must get it so: they learnt these
    captions only, and their T5 knows no capitals or punctuation (its ids would all be unknown)."""
    return " ".join(prompt.lower().split()).rstrip(string.punctuation + " ")


def parse(caption: str | Caption) -> Caption:
    """The attributes of a caption; ValueError (one line, naming the caption and the grammar) if
    it is outside the grammar. Read as `normalize` writes it: case, runs of whitespace and final
    punctuation are ignored."""
    if isinstance(caption, Caption):
        return caption
    if not isinstance(caption, str):
        raise _grammar_error(f"caption {caption!r} (a {type(caption).__name__}, not a str)")
    match = _CAPTION_RE.fullmatch(normalize(caption))
    if match is None:
        raise _grammar_error(f"caption {caption!r}")
    color, shape, background, position = match.groups()
    if position == CENTER:  # centred is said by saying nothing; "in the center" is not in the grammar
        raise _grammar_error(f"caption {caption!r}")
    try:
        return Caption(color, shape, background, position or CENTER)
    except ValueError:
        raise _grammar_error(f"caption {caption!r}") from None


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (color, shape, background) with two different colours: 8 * 3 * 7 = 168, in
    `PALETTE`, `SHAPES`, `PALETTE` order."""
    return [(c, s, b) for c in PALETTE for s in SHAPES for b in PALETTE if b != c]


def all_captions() -> list[str]:
    """Every caption of the grammar: each combination of `all_combinations` centred, then in each
    of `POSITIONS` (168 * 5 = 840)."""
    return [Caption(*combo, p).text for combo in all_combinations() for p in (CENTER, *POSITIONS)]


def split_combinations() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(seen, held_out), each in `all_combinations` order: a combination is held out when
    (i_color + 2 i_background + 3 i_shape) mod 7 == 0 (indices in `PALETTE` and `SHAPES` order).

    A fixed rule rather than a random draw, so that training and evaluation agree on any machine
    and a reader can check a combination by hand; see the module docstring for its properties.
    """
    colors = list(PALETTE)
    seen, held_out = [], []
    for c, s, b in all_combinations():
        key = colors.index(c) + 2 * colors.index(b) + 3 * SHAPES.index(s)
        (held_out if key % 7 == 0 else seen).append((c, s, b))
    return seen, held_out


SEEN, HELD_OUT = (frozenset(part) for part in split_combinations())


def is_held_out(caption: str | Caption) -> bool:
    """Whether the caption's (color, shape, background) is in `HELD_OUT`."""
    return parse(caption).combination in HELD_OUT


def captions(seed: int = 0, combinations: Iterable[tuple[str, str, str]] | None = None,
             positions: Iterable[str] | None = None) -> Iterator[str]:
    """An endless stream of captions, each drawn uniformly and independently, the same for a seed.

    combinations: the (color, shape, background) triples to draw from (default all; pass `SEEN`
    to train, `HELD_OUT` to test); positions: from `POSITIONS` and `CENTER` (default all five).
    Both are sorted first, so a set gives the same stream in every process.
    """
    combos = sorted(all_combinations() if combinations is None else set(combinations))
    places = sorted((CENTER, *POSITIONS) if positions is None else set(positions))
    if not combos or not places:
        raise ValueError("captions: combinations and positions must not be empty")
    for combo in combos:
        for place in places:
            Caption(*combo, place)  # checks every pair before the first caption is yielded
    rng = np.random.default_rng(seed)
    while True:
        yield Caption(*combos[rng.integers(len(combos))], places[rng.integers(len(places))]).text


def examples(seed: int = 0, size: int = 64, combinations: Iterable[tuple[str, str, str]] | None = None,
             positions: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """An endless stream of (caption, image) pairs, the image uint8 (size, size, 3): the captions of
    `captions(seed, ...)`, the k-th (from 0) drawn with `draw(caption, size, seed=(seed, k))`."""
    for k, caption in enumerate(captions(seed, combinations, positions)):
        yield caption, draw(caption, size, seed=(seed, k))


def shape_box(caption: str | Caption, seed=0) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, y0, x1, y1) in fractions of the image side, as `draw` places it.

    seed: an int or anything `numpy.random.default_rng` takes (a tuple of ints, ...).
    """
    x, y = REGION_CENTERS[parse(caption).position]
    rng = np.random.default_rng(seed)
    half = rng.uniform(*SHAPE_SIDE) / 2
    x, y = np.array([x, y]) + rng.uniform(-JITTER, JITTER, size=2)
    return (float(x - half), float(y - half), float(x + half), float(y + half))


def draw(caption: str | Caption, size: int = 64, seed=0) -> np.ndarray:
    """The caption's image: uint8 numpy array (size, size, 3), RGB.

    size: the side in pixels, at least `MIN_SIZE`; seed: the jitter of the shape's size and place
    (`shape_box`), an int or anything `numpy.random.default_rng` takes. The same caption, size and
    seed give the same pixels; the same caption and seed at another size give the same picture.
    """
    attrs = parse(caption)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"draw: size must be an int >= {MIN_SIZE}, got {size!r}")
    x0, y0, x1, y1 = (v * size for v in shape_box(attrs, seed))
    # only the pixels the box touches can be covered: sample those, at the centres of a 4x4 grid
    # inside every pixel, in pixel units
    c0, c1, r0, r1 = max(math.floor(x0), 0), min(math.ceil(x1), size), max(math.floor(y0), 0), min(math.ceil(y1), size)
    px = (np.arange(c0 * _SUPERSAMPLE, c1 * _SUPERSAMPLE) + 0.5)[None, :] / _SUPERSAMPLE
    py = (np.arange(r0 * _SUPERSAMPLE, r1 * _SUPERSAMPLE) + 0.5)[:, None] / _SUPERSAMPLE
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if attrs.shape == "circle":
        inside = (px - cx) ** 2 + (py - cy) ** 2 <= half ** 2
    elif attrs.shape == "square":
        inside = (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
    else:  # triangle: the half-width grows from 0 at the apex (y0) to half at the base (y1)
        inside = (py <= y1) & (np.abs(px - cx) <= (py - y0) / 2)
    coverage = np.zeros((size, size, 1))
    coverage[r0:r1, c0:c1, 0] = inside.reshape(r1 - r0, _SUPERSAMPLE, c1 - c0, _SUPERSAMPLE).mean(axis=(1, 3))
    shape_rgb, background_rgb = (np.array(PALETTE[c], np.float64) for c in (attrs.color, attrs.background))
    return np.rint(coverage * shape_rgb + (1 - coverage) * background_rgb).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Classification:
    """What `classify` saw in one image, against the caption it was asked for (`expected`).

    color, background: `PALETTE` names. shape, position: a `SHAPES` name and a `POSITIONS` name
    or `CENTER`, or None when no shape-coloured region was found (the patch at the named position
    has the background's colour). fill: the region's area over its bounding box's (nan if none);
    centroid: its (x, y) in fractions of the width and height (None if none).
    """

    expected: Caption
    color: str
    shape: str | None
    background: str
    position: str | None
    fill: float
    centroid: tuple[float, float] | None

    @property
    def correct(self) -> dict[str, bool]:
        """For each of `ATTRIBUTES`, whether the prediction matches the caption."""
        return {a: getattr(self, a) == getattr(self.expected, a) for a in ATTRIBUTES}


def _rgb(image) -> np.ndarray:
    """An RGB image (uint8, or float in [0, 1]; numpy, PIL, anything np.asarray takes) as float64
    (H, W, 3) in [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < MIN_SIZE:
        raise ValueError(f"classify: image must be RGB (H, W, 3) with H, W >= {MIN_SIZE}, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"classify: image must be uint8 or float in [0, 1], got dtype {array.dtype}")
    low, high = float(np.min(array)), float(np.max(array))
    if not (0.0 <= low and high <= 1.0):  # also catches nan
        raise ValueError(f"classify: a float image must lie in [0, 1], got values in [{low}, {high}]")
    return array.astype(np.float64)


_PALETTE_UNIT = np.array(list(PALETTE.values()), np.float64) / 255.0


def _nearest_color(pixels: np.ndarray) -> str:
    """The `PALETTE` name nearest (in RGB) to the per-channel median of pixels (N, 3)."""
    median = np.median(pixels, axis=0)
    return list(PALETTE)[int(np.argmin(((_PALETTE_UNIT - median) ** 2).sum(axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask, as a mask (all False if none).

    Every pixel starts with its own label; each round takes the smallest label among the pixel and
    its four neighbours, then the label of the pixel its label names (pointer jumping), so labels
    spread across a region in about log(its diameter) rounds rather than its diameter.
    """
    if not mask.any():
        return mask
    h, w = mask.shape
    none = h * w  # the label of pixels outside the mask: larger than every pixel index
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        spread = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, none)
        # a label is the index of a pixel of the same region; that pixel's label is no larger
        jumped = np.where(mask, spread.ravel()[np.minimum(spread, none - 1)], none)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    counts = np.bincount(labels[mask])
    return labels == int(np.argmax(counts))


def _span(center: float, half: float, n: int) -> slice:
    """The pixels of [center - half, center + half) (fractions of n pixels), at least one."""
    start = round((center - half) * n)
    return slice(start, max(round((center + half) * n), start + 1))


def classify(image, caption: str | Caption) -> Classification:
    """Grade one image against the caption it was asked for (see the module docstring for how).

    image: RGB (H, W, 3), uint8 or float in [0, 1] (a numpy array, or a PIL image); H and W need
    not be equal. caption: a caption of the grammar (str or `Caption`).

    On `draw`'s own images every attribute of every caption is right at each size checked from 36
    to 256 px; smaller, the triangle's anti-aliased apex starts to give it a circle's fill (at 32 px
    99.6% of shapes are right, at 16 px 94%; colours and positions stay right).
    """
    expected = parse(caption)
    pixels = _rgb(image)
    h, w = pixels.shape[:2]

    x, y = REGION_CENTERS[expected.position]
    color = _nearest_color(pixels[_span(y, _COLOR_PATCH, h), _span(x, _COLOR_PATCH, w)].reshape(-1, 3))

    ch, cw = max(1, round(_CORNER_PATCH * h)), max(1, round(_CORNER_PATCH * w))
    corners = {"tl": pixels[:ch, :cw], "tr": pixels[:ch, -cw:], "bl": pixels[-ch:, :cw], "br": pixels[-ch:, -cw:]}
    background = _nearest_color(np.concatenate([corners[k].reshape(-1, 3) for k in _CORNERS_AWAY[expected.position]]))

    shape_rgb, background_rgb = (_PALETTE_UNIT[list(PALETTE).index(c)] for c in (color, background))
    # |p - s|^2 < |p - b|^2  <=>  2 p.(s - b) > |s|^2 - |b|^2: one dot product per pixel
    nearer_shape = 2 * pixels @ (shape_rgb - background_rgb) > shape_rgb @ shape_rgb - background_rgb @ background_rgb
    region = _largest_component(nearer_shape)  # empty when the two colours are the same
    if not region.any():
        return Classification(expected, color, None, background, None, float("nan"), None)

    ys, xs = np.nonzero(region)
    fill = float(region.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    centroid = (float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h))
    position = min(REGION_CENTERS, key=lambda p: math.dist(REGION_CENTERS[p], centroid))
    return Classification(expected, color, shape, background, position, fill, centroid)


def accuracy(results: Iterable[Classification]) -> dict[str, float]:
    """The fraction of results right for each of `ATTRIBUTES`, and for all four at once ("all")."""
    results = list(results)
    if not results:
        raise ValueError("accuracy: no classifications given")
    rights = [r.correct for r in results]
    summary = {a: sum(c[a] for c in rights) / len(rights) for a in ATTRIBUTES}
    summary["all"] = sum(all(c.values()) for c in rights) / len(rights)
    return summary
