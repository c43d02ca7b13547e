"""FluxPipeline(sharding=...) on 8 simulated CPU devices gives the single-device image.

The pipelines run on a hub-layout fixture saved here, in this process (8 devices: tests/conftest.py).
Limit: fp32 pixels within 1e-5 of one device (measured 1.2e-6 to 1.6e-6).
"""

import jax
import numpy as np
import pytest

import diffusers  # noqa: F401 (a test dependency: the test extra installs it; missing, this file fails)

from fluxjax.parallel.strategies import Strategy
from fluxjax.pipeline.pipeline import FluxPipeline
from fluxjax.testing.reference import make_hub_pipeline

pytestmark = pytest.mark.slow  # minutes of compiles on a loaded CPU: outside the fast tier

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
    return [list(s) for s in sorted({tuple(s.data.shape) for s in x.addressable_shards})]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    """Per (strategy, mesh, batch) case the max abs pixel error against the single-device pipeline
    and the shard shapes of the live parameters and latents."""
    hub = tmp_path_factory.mktemp("hub_sharding")
    make_hub_pipeline(hub, "dev")
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
    return out


def test_every_strategy_gives_the_single_device_image(facts):
    assert facts["devices"] == 8
    seen = set()
    for case in facts["cases"]:
        seen.add(case["strategy"])
        for batch, (shape, error) in case["errors"].items():
            assert shape[0] == int(batch), case  # padding rows are dropped
            assert error <= 1e-5, (case["strategy"], case["mesh"], batch, error)
    assert seen == {"dp", "fsdp", "tp", "fsdp_tp"}
    for case in facts["cases"]:  # Kontext: reference tokens appended in the sequence, batch 3 padded
        shape, error = case["kontext"]
        assert shape[0] == 3 and error <= 1e-5, (case["strategy"], case["mesh"], "kontext", error)
    # Both a batch that divides the data axes and one that has to be padded were run.
    assert any(int(b) % 8 == 0 for c in facts["cases"] if c["strategy"] == "dp" for b in c["errors"])
    assert any(b == "3" for c in facts["cases"] for b in c["errors"])


def test_img2img_under_every_strategy_gives_the_single_device_image(facts):
    """img2img with an inpainting mask (IMG2IMG above), same limit."""
    assert {c["strategy"] for c in facts["cases"] if c["img2img"]} == {"dp", "fsdp", "tp", "fsdp_tp"}
    for case in facts["cases"]:
        for batch, (shape, error) in case["img2img"].items():
            assert shape[0] == int(batch), case
            assert error <= 1e-5, (case["strategy"], case["mesh"], batch, error)


def _case(facts, strategy, mesh):
    return next(c for c in facts["cases"] if c["strategy"] == strategy and c["mesh"] == mesh)


def test_weights_are_laid_out_as_the_tables_say(facts):
    # qkv kernel (layers, embed, qkv); proj kernel (layers, heads, embed); T5 wi_0 (layers, embed, mlp)
    dp = _case(facts, "dp", {"data": 8})
    for key in ("qkv", "proj", "t5_wi"):
        assert dp[key][1] == [dp[key][0]]  # replicated: every device holds the whole kernel
    fsdp = _case(facts, "fsdp", {"fsdp": 8})
    (layers, embed, qkv), = [fsdp["qkv"][0]]
    assert fsdp["qkv"][1] == [[layers, embed // 8, qkv]]  # 1/8 of the kernel, split on embed
    tp = _case(facts, "tp", {"data": 2, "tensor": 4})
    assert tp["qkv"][1] == [[layers, embed, qkv // 4]]  # column-parallel
    assert tp["proj"][1] == [[layers, tp["proj"][0][1] // 4, embed]]  # row-parallel
    both = _case(facts, "fsdp_tp", {"fsdp": 4, "tensor": 2})
    assert both["qkv"][1] == [[layers, embed // 4, qkv // 2]]
    t5 = both["t5_wi"][0]
    assert both["t5_wi"][1] == [[t5[0], t5[1] // 4, t5[2] // 2]]  # T5 is sharded by the same table
