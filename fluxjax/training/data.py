"""Training data: a folder of captioned images, aspect-ratio buckets, cached latents and text
embeddings, and a deterministic batch order.

A folder holds images (.png, .jpg, .jpeg, .webp, .bmp) with captions either beside them
(`cat.png` + `cat.txt`) or in a `metadata.jsonl` of {"file_name": ..., "text": ...} lines (the
common image-folder layout). Every problem is found by `scan_folder` before any step runs and
named in one line: an empty folder, an image without a caption, an unreadable image (or one
that is not a regular file: a FIFO would block the read forever), a side below 16 pixels, a
caption file or metadata.jsonl that is not UTF-8. Images are read as fluxjax reads every input
image (images.read_image: EXIF orientation applied, 16-bit scaled to 8-bit).

Buckets: each image is resized (cover) and centre-cropped to the bucket of its aspect ratio,
sides multiples of 16 with about `resolution`^2 pixels. A batch holds one bucket only.

Cache: the VAE latents (posterior mean, packed (L_img, 64)) and the text embeddings (T5 txt
(L_txt, 4096), CLIP vec (768,)) of every example are computed once and kept as .npz files named
by a hash of everything they depend on: the frozen models' weights and configs, the image's
bytes, the caption, the bucket and the T5 length. Changing any of them computes anew. For a
FLUX.2 pipeline (flux2.Flux2Pipeline, klein base): the FLUX.2 VAE's tokens (posterior mean, 2x2
patched, batch-norm normalised, packed: (L_img, 128), as the pipeline encodes reference images)
and the text encoder's stacked hidden states (klein: Qwen3 layers 9, 18, 27 after the chat
template, (L_txt, 3 hidden)); no pooled vector.

Order: batch i is a pure function of (seed, i): each epoch permutes each bucket's examples and
the order of the batches with numpy's generator seeded by (seed, epoch), dropping a bucket's
last incomplete batch. So a run resumed at step i reads exactly the batches an uninterrupted
run reads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from fluxjax.errors import UsageError, check_regular_file
from fluxjax.images import read_image
from fluxjax.sampling.sampler import PIXELS_PER_TOKEN
from fluxjax.pipeline.text import decode_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
# How the pixels of an image file are read, part of a cached latent's key: latents cached before
# images.read_image applied EXIF orientation and scaled 16-bit images are computed anew.
PIXELS = "images.read_image 1"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image: its path, caption and size in pixels."""

    path: str
    caption: str
    width: int
    height: int


def _read_text(path: str) -> list[str]:
    """The lines of a caption file or metadata.jsonl; UsageError "FILE:LINE: ..." for one that is
    not UTF-8 (the encoding every caption tool writes; the locale's would differ machine to machine)."""
    check_regular_file(path)
    with open(path, "rb") as f:
        return [decode_line(raw, f"{path}:{number}") for number, raw in enumerate(f, 1)]


def scan_folder(folder: str | os.PathLike) -> list[Example]:
    """The examples of `folder`, sorted by file name; UsageError naming the file on bad input."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: not a folder (expected images with captions)")
    images = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    meta_path = os.path.join(folder, METADATA)
    captions: dict[str, str] = {}
    if os.path.isfile(meta_path):
        for number, line in enumerate(_read_text(meta_path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions[record["file_name"]] = str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(f"{meta_path}:{number}: expected a JSON object with file_name and text ({e})") from None
        unknown = sorted(set(captions) - set(images))
        if unknown:
            raise UsageError(f"{meta_path}: names {unknown[0]!r}, which is not an image in {folder}")
    if not images:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    examples = []
    for name in images:
        path = os.path.join(folder, name)
        if name in captions:
            caption = captions[name]
        else:
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.isfile(txt):
                raise UsageError(f"{path}: no caption (expected {os.path.basename(txt)} beside it or an entry in {METADATA})")
            caption = "".join(_read_text(txt)).strip()
        width, height = read_image(path, "").size  # decoded in full: a bad image fails here, not mid-training
        if min(width, height) < PIXELS_PER_TOKEN:
            raise UsageError(f"{path}: {width}x{height} pixels, a side below the {PIXELS_PER_TOKEN} px minimum")
        examples.append(Example(path, caption, width, height))
    return examples


def bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(bucket width, bucket height): the image's aspect ratio, about resolution^2 pixels, both
    sides multiples of 16 (at least 16)."""
    aspect = width / height
    side = lambda x: max(PIXELS_PER_TOKEN, int(round(x / PIXELS_PER_TOKEN)) * PIXELS_PER_TOKEN)  # noqa: E731
    return side(resolution * math.sqrt(aspect)), side(resolution / math.sqrt(aspect))


def load_pixels(path: str, width: int, height: int) -> np.ndarray:
    """(height, width, 3) float32 in [-1, 1]: the image (images.read_image: upright, 8-bit RGB)
    scaled to cover the box (bicubic), centre-cropped."""
    from PIL import Image

    im = read_image(path, "")
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    im = im.crop((left, top, left + width, top + height))
    return np.asarray(im, np.float32) / 127.5 - 1.0


class Batches:
    """The deterministic batch order over buckets: `indices(i)` is batch i (a list of example
    indices, all of one bucket), a pure function of (seed, i)."""

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int):
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        self.seed, self.batch_size = seed, batch_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(b, []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        self.per_epoch = sum(len(g) // batch_size for g in self.groups)
        if self.per_epoch == 0:
            sizes = ", ".join(f"{w}x{h}: {len(groups[(w, h)])}" for w, h in sorted(groups))
            raise UsageError(f"batch size {batch_size}: no aspect bucket has that many images ({sizes}); "
                             "lower --batch-size or add images")

    def indices(self, i: int) -> list[int]:
        epoch, within = divmod(i, self.per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        chunks = []
        for group in self.groups:
            order = rng.permutation(group)
            chunks += [order[j:j + self.batch_size].tolist() for j in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        return chunks[int(rng.permutation(len(chunks))[within])]


def fingerprint(*trees: Any) -> str:
    """A hash of parameter trees' structure, shapes, dtypes and values (float64 sums of each
    leaf and of its squares): what the cache keys on to notice a different model."""
    import jax

    from fluxjax.parallel import distributed

    h = hashlib.sha256()
    for tree in trees:
        for path, leaf in jax.tree.flatten_with_path(tree)[0]:
            x = distributed.host_array(leaf).astype(np.float64)
            h.update(f"{jax.tree_util.keystr(path)}{x.shape}{leaf.dtype}{x.sum()!r}{np.square(x).sum()!r}".encode())
    return h.hexdigest()


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EncodedDataset:
    """The examples of a folder with cached latents and text embeddings, served as batches.

    pipe: a fluxjax FluxPipeline whose frozen T5, CLIP and VAE (and tokenizer) encode the data;
    they run only here, never inside the train step. resolution: the bucket area's side.
    max_sequence_length: T5 tokens per caption. cache_dir: where the .npz files go.

    Several processes (one job, a shared cache_dir): the frozen models are sharded over all
    their devices, so an encoder call is a collective every process joins; which entries are
    missing is decided once, by process 0, all compute them together, process 0 alone writes
    them (no two writers of one file), and the others read the files once it is done.
    """

    def __init__(self, examples: Sequence[Example], pipe, resolution: int, max_sequence_length: int,
                 cache_dir: str | os.PathLike, progress: bool = False):
        self.examples = list(examples)
        self.buckets = [bucket(e.width, e.height, resolution) for e in self.examples]
        self.max_sequence_length = max_sequence_length
        self.cache_dir = os.fspath(cache_dir)
        self._pipe = pipe
        self.flux2 = is_flux2_pipeline(pipe)
        encoders = (pipe.text_encoder,) if self.flux2 else (pipe.t5, pipe.clip)
        self._model_key = fingerprint(pipe.vae.params, *(e.params for e in encoders)) + repr(
            (pipe.vae.model.config, *(e.model.config for e in encoders), str(pipe.transformer.model.dtype))
            + ((pipe.family.pipeline_class, pipe.family.layers) if self.flux2 else ()))
        self.computed = 0  # how many entries this object encoded (the rest came from the cache)
        from tqdm import tqdm

        from fluxjax.parallel import distributed

        self.files = [self._entry_path(i) for i in range(len(self.examples))]
        empty = os.path.join(self.cache_dir, f"text-{self._key('text', '')}.npz")
        cached = distributed.on_primary(_cached, self.cache_dir, self.files + [empty])
        for i in tqdm(range(len(self.examples)), desc="caching latents", disable=not progress or None):
            if not cached[i]:
                self._encode_entry(i)
        if not cached[-1]:
            txt, vec = self._encode_text("")
            self._save(empty, txt=txt, vec=vec)
        distributed.barrier("fluxjax-cache")  # process 0's files are written before any process reads them
        with np.load(empty) as z:
            self.empty = {"txt": z["txt"], "vec": z["vec"]}

    def _key(self, *parts: Any) -> str:
        return hashlib.sha256(repr((self._model_key, self.max_sequence_length) + parts).encode()).hexdigest()[:32]

    def _encode_text(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """(txt (L_txt, context_dim), vec (vec_dim,)) float32; FLUX.2: vec (0,), there is none."""
        from fluxjax.parallel import distributed

        if self.flux2:
            txt = self._pipe.encode([caption], self.max_sequence_length)
            return distributed.host_array(txt)[0].astype(np.float32), np.zeros((0,), np.float32)
        t5_ids, clip_ids = self._pipe.tokenizer([caption], self.max_sequence_length)
        txt, vec = self._pipe.encode(t5_ids, clip_ids)
        return (distributed.host_array(txt)[0].astype(np.float32),
                distributed.host_array(vec)[0].astype(np.float32))

    def _save(self, path: str, **arrays: np.ndarray) -> None:
        from fluxjax.parallel import distributed

        if distributed.is_primary():
            _save_npz(path, **arrays)
        self.computed += 1

    def _entry_path(self, i: int) -> str:
        e, (w, h) = self.examples[i], self.buckets[i]
        return os.path.join(self.cache_dir, f"{self._key(_file_hash(e.path), PIXELS, e.caption, w, h)}.npz")

    def _encode_entry(self, i: int) -> None:
        from fluxjax.parallel import distributed
        from fluxjax.pipeline.conditioning import encode_packed

        e, (w, h) = self.examples[i], self.buckets[i]
        pixels = load_pixels(e.path, w, h)[None]
        vae = self._pipe.vae
        # The pipeline's own encode, compiled once per bucket shape (not a new jit per image).
        encode = _flux2_tokens if self.flux2 else encode_packed
        latents = distributed.host_array(encode(vae.model, vae.params, pixels)).astype(np.float32)[0]  # (L, 64 or 128)
        txt, vec = self._encode_text(e.caption)
        self._save(self.files[i], latents=np.asarray(latents, np.float32), txt=txt, vec=vec)

    def batch(self, indices: Sequence[int]) -> dict:
        """The host batch of `Trainer.step` for these example indices (one bucket)."""
        from fluxjax.sampling.sampler import image_ids, text_ids

        rows = []
        for i in indices:
            with np.load(self.files[i]) as z:
                rows.append({k: z[k] for k in ("latents", "txt", "vec")})
        (w, h), n = self.buckets[indices[0]], len(indices)
        if self.flux2:  # 4 id columns (flux2.position_ids, text_ids) and no pooled vector
            from fluxjax.pipeline import flux2

            step = PIXELS_PER_TOKEN
            return {"latents": np.stack([r["latents"] for r in rows]),
                    "img_ids": flux2.position_ids(n, h // step, w // step),
                    "txt": np.stack([r["txt"] for r in rows]),
                    "txt_ids": flux2.text_ids(n, rows[0]["txt"].shape[0]),
                    "empty_txt": self.empty["txt"][None]}
        return {
            "latents": np.stack([r["latents"] for r in rows]),
            "img_ids": np.ascontiguousarray(image_ids(n, h, w)),
            "txt": np.stack([r["txt"] for r in rows]),
            "txt_ids": text_ids(n, rows[0]["txt"].shape[0]),
            "vec": np.stack([r["vec"] for r in rows]),
            "empty_txt": self.empty["txt"][None],
            "empty_vec": self.empty["vec"][None],
        }


def is_flux2_pipeline(pipe) -> bool:
    from fluxjax.pipeline.flux2 import Flux2Pipeline

    return isinstance(pipe, Flux2Pipeline)


@functools.lru_cache(maxsize=None)
def _flux2_encode():
    import jax

    from fluxjax.pipeline.flux2 import encode_tokens

    return jax.jit(encode_tokens, static_argnums=0)


def _flux2_tokens(model, params, pixels):
    """flux2.encode_tokens, jitted (compiled once per bucket shape): (1, H, W, 3) [-1, 1] -> (1, L, 128)."""
    return _flux2_encode()(model, params, pixels)


def _cached(cache_dir: str, paths: list[str]) -> list[bool]:
    """Make cache_dir; which of `paths` it holds."""
    os.makedirs(cache_dir, exist_ok=True)
    return [os.path.isfile(p) for p in paths]


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    """Write arrays to `path` under a temporary name and rename: a cache file is whole or absent."""
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
