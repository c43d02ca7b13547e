"""FluxPipeline under every shipped strategy on 8 simulated CPU devices; prints JSON facts.

Run by tests/test_pipeline_sharding.py in a subprocess (the device count must be set before jax
is imported): `python tests/pipeline_sharding_worker.py HUB_FOLDER`. For each (strategy, mesh,
batch) case it prints the max abs pixel error against the single-device pipeline and the
shard shapes of the live parameters and latents; the test decides what is right.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["FLUXJAX_COMPILATION_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402
from fluxjax.parallel.strategies import Strategy  # noqa: E402

# (strategy, ici mesh shape, batch sizes): one batch that divides the data axes where the
# compile time allows, and one (3) that divides none above 1, so it is padded.
CASES = [
    ("dp", (8,), (8, 3)),
    ("fsdp", (8,), (3,)),
    ("tp", (2, 4), (2, 3)),
    ("fsdp_tp", (4, 2), (3,)),
    ("fsdp_tp", (2, 4), (4,)),
]
PROMPTS = ["a photo of a cat", "a red fox in the snow", "a bowl of ramen", "an old man with a beard",
           "a lighthouse at sunset", "a city at night", "a small cabin in a forest", "a cup of coffee"]
KW = dict(height=48, width=80, num_steps=2, guidance=3.5, max_sequence_length=16, output="np")
# img2img with an inpainting mask, at each case's last batch: the schedule cut, the image's
# encoding and noising, and the blend after each step, all on the mesh (height/width from the image).
_MASK = np.zeros((48, 80), np.float32)
_MASK[:, 24:56] = 1.0
IMG2IMG = dict(image=np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8), strength=0.6,
               mask_image=_MASK)
# Kontext's reference path (one 32 x 64 reference, 8 tokens after the image's 15), run on the base
# model with allow_references=True: the same code as a Kontext checkpoint's, without a second load.
REFERENCE = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
KONTEXT = dict(reference_images=[REFERENCE], allow_references=True, auto_resize=False, max_area=48 * 80)
KONTEXT_BATCH = 3


def shard_shapes(x: jax.Array) -> list[list[int]]:
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def main(hub: str) -> None:
    single = FluxPipeline.from_pretrained(hub, dtype="float32")
    reference = {b: single(PROMPTS[:b], seed=0, **KW) for b in sorted({b for *_, bs in CASES for b in bs})}
    conditioned = {b: single(PROMPTS[:b], seed=0, **KW, **IMG2IMG) for b in sorted({bs[-1] for *_, bs in CASES})}
    kontext = single(PROMPTS[:KONTEXT_BATCH], seed=0, **KW, **KONTEXT)
    out = {"devices": jax.device_count(), "max_pixel": float(max(np.abs(r).max() for r in reference.values())), "cases": []}
    for name, ici, batches in CASES:
        strategy = Strategy.load(name).with_ici(*ici)
        pipe = FluxPipeline.from_pretrained(hub, dtype="float32", sharding=strategy)
        p = pipe.transformer.params
        case = {
            "strategy": name, "ici": list(ici), "mesh": dict(pipe.mesh.shape),
            "qkv": [list(p["double_blocks"]["img_attn"]["qkv"]["kernel"].shape), shard_shapes(p["double_blocks"]["img_attn"]["qkv"]["kernel"])],
            "proj": [list(p["double_blocks"]["img_attn"]["proj"]["kernel"].shape), shard_shapes(p["double_blocks"]["img_attn"]["proj"]["kernel"])],
            "t5_wi": [list(pipe.t5.params["block"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"].shape),
                      shard_shapes(pipe.t5.params["block"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"])],
            "errors": {}, "img2img": {},
        }
        for b in batches:
            images = pipe(PROMPTS[:b], seed=0, **KW)
            case["errors"][str(b)] = [list(images.shape), float(np.abs(images - reference[b]).max())]
        images = pipe(PROMPTS[:batches[-1]], seed=0, **KW, **IMG2IMG)
        case["img2img"][str(batches[-1])] = [list(images.shape),
                                             float(np.abs(images - conditioned[batches[-1]]).max())]
        images = pipe(PROMPTS[:KONTEXT_BATCH], seed=0, **KW, **KONTEXT)
        case["kontext"] = [list(images.shape), float(np.abs(images - kontext).max())]
        out["cases"].append(case)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
