"""FLUX.2 [klein] with cached references against diffusers' Flux2KleinKVPipeline: a tiny random
folder saved by that pipeline (model_index.json `_class_name` "Flux2KleinKVPipeline", no
is_distilled) loads as a Flux2Pipeline whose references are cached (fluxjax/pipeline/flux2_kv.py);
pixels with one and two reference images, and without references the plain klein path.

The components are test_flux2_pipeline's (tiny, built with diffusers' and transformers' classes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline

from fluxjax.errors import UsageError
from fluxjax.pipeline import flux2
from fluxjax.pipeline.pipeline import FluxPipeline
from test_flux2_pipeline import LENGTH, PIXEL_TOL, PROMPTS, _components, _latents, _reference_images


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    """(diffusers' Flux2KleinKVPipeline, fluxjax's pipeline of its saved folder), float32."""
    root = tmp_path_factory.mktemp("klein_kv")
    ref = Flux2KleinKVPipeline(**_components(root))
    ref.save_pretrained(root / "hub")
    return ref, FluxPipeline.from_pretrained(root / "hub", dtype="float32", attention_impl="xla"), root / "hub"


def _run(ref, pipe, prompt, image, height=32, width=48, steps=2):
    batch = len(prompt) if isinstance(prompt, list) else 1
    latents = _latents(batch, height, width)
    theirs = {} if image is None else {"image": image}
    with torch.no_grad():
        want = ref(prompt=prompt, height=height, width=width, num_inference_steps=steps, latents=latents,
                   max_sequence_length=LENGTH, output_type="np", **theirs).images
    got = pipe(prompt, height, width, num_steps=steps, latents=latents.numpy(), max_sequence_length=LENGTH,
               output="np", image=image)
    assert got.shape == want.shape and want.std() > 0.02
    return got, want


def test_folder_loads_as_klein_with_cached_references(kv):
    _, pipe, root = kv
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "Flux2KleinKVPipeline"
    assert isinstance(pipe, flux2.Flux2Pipeline) and pipe.family is flux2.KLEIN_KV
    assert pipe.is_distilled and pipe.defaults == flux2.DISTILLED  # 4 steps, no CFG, as that pipeline
    with pytest.raises(UsageError, match="distilled"):
        pipe(PROMPTS[0], 32, 32, num_steps=1, true_cfg_scale=3.0)
    with pytest.raises(UsageError, match="inpainting"):
        pipe(PROMPTS[0], num_steps=1, image=_reference_images()[0], mask_image=_reference_images()[0])


@pytest.mark.parametrize("count", [1, 2])
def test_cached_references_match_diffusers(kv, count):
    """Measured: max |pixel error| 5.1e-6 (one reference), 4.9e-6 (two). (Run with the references in
    the sequence, as Flux2KleinPipeline, the one-reference image differs by more than 1e-2: a cache
    left unused fails this; not asserted here, to spare CI a compile.)"""
    ref, pipe, _ = kv
    images = _reference_images()[:count]
    got, want = _run(ref, pipe, PROMPTS[0], images[0] if count == 1 else images)
    err = float(np.abs(got - want).max())
    print(f"Flux2KleinKVPipeline, {count} reference(s): max |pixel error| {err:.2e}")
    assert err < PIXEL_TOL


def _plain_klein(pipe):
    """A Flux2KleinPipeline run of `pipe`'s components (no cache, references in the sequence)."""
    return flux2.Flux2Pipeline(pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.schedule, True,
                               pipe.name, flux2.KLEIN)


class _Bar:
    """Records what a pipeline does with its tqdm bar."""

    made: list = []

    def __init__(self, total, disable=None, **kw):
        self.total, self.disable, self.count = total, disable, 0
        _Bar.made.append(self)

    def update(self, n=1):
        self.count += n

    def set_description(self, desc):
        pass

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_without_references_is_plain_klein_with_a_progress_bar(kv, monkeypatch):
    ref, pipe, _ = kv
    monkeypatch.setattr("tqdm.tqdm", _Bar)
    with torch.no_grad():
        want = ref(prompt=PROMPTS[0], height=32, width=48, num_inference_steps=2, latents=_latents(1, 32, 48),
                   max_sequence_length=LENGTH, output_type="np").images
    calls = dict(num_steps=2, latents=_latents(1, 32, 48).numpy(), max_sequence_length=LENGTH, output="np",
                 progress=True)
    got = pipe(PROMPTS[0], 32, 48, **calls)
    assert float(np.abs(got - want).max()) < PIXEL_TOL
    np.testing.assert_array_equal(got, _plain_klein(pipe)(PROMPTS[0], 32, 48, **calls))
    bar = _Bar.made[-1]  # encoding, 2 steps reported by the loop, decoding
    assert (bar.total, bar.count, bar.disable, bar.closed) == (4, 4, None, True)


def test_a_hub_repo_id_is_resolved(kv, monkeypatch):
    """A repo-id-shaped source goes through sources.resolve_source (snapshot_download, here
    returning the tiny folder: nothing is downloaded), from both from_pretrained."""
    _, _, root = kv
    asked = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: asked.append(repo) or str(root))
    for load in (FluxPipeline.from_pretrained, flux2.Flux2Pipeline.from_pretrained):
        pipe = load("someone/klein-kv", dtype="float32", attention_impl="xla")
        assert isinstance(pipe, flux2.Flux2Pipeline) and pipe.family is flux2.KLEIN_KV
    assert asked == ["someone/klein-kv"] * 2
    with pytest.raises(UsageError, match="no such folder"):
        flux2.Flux2Pipeline.from_pretrained("no/such/folder")
