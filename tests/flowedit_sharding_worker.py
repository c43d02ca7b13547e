"""pipe.edit under every shipped strategy on 8 simulated CPU devices; prints JSON facts.

Run by tests/test_flowedit.py in a subprocess (the device count must be set before jax is
imported): `python tests/flowedit_sharding_worker.py HUB_FOLDER`. For each (strategy, mesh,
batch) case it prints the max abs error of the edited latents against the single-device edit;
the test decides what is right.
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

# (strategy, ici mesh shape, batch): batches that divide the data axes and ones (3) that are padded.
CASES = [("dp", (8,), 3), ("fsdp", (8,), 2), ("tp", (2, 4), 2), ("fsdp_tp", (4, 2), 3)]
SOURCES = ["a red circle on a blue background", "a photo of a cat", "a bowl of ramen"]
TARGETS = ["a green circle on a blue background", "a photo of a dog", "a bowl of salad"]
# n_min 1 and n_avg 2: both phases of the loop and the batched draws run.
KW = dict(num_steps=4, n_max=3, n_min=1, n_avg=2, source_guidance=1.5, target_guidance=5.5, seed=5,
          max_sequence_length=16, output="latents")


def images(batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(batch)]


def main(hub: str) -> None:
    single = FluxPipeline.from_pretrained(hub, dtype="float32")
    reference = {b: single.edit(images(b), SOURCES[:b], TARGETS[:b], **KW) for b in sorted({b for *_, b in CASES})}
    out = {"devices": jax.device_count(), "scale": float(max(np.abs(r).max() for r in reference.values())), "cases": []}
    for name, ici, batch in CASES:
        strategy = Strategy.load(name).with_ici(*ici)
        pipe = FluxPipeline.from_pretrained(hub, dtype="float32", sharding=strategy)
        edited = pipe.edit(images(batch), SOURCES[:batch], TARGETS[:batch], **KW)
        out["cases"].append({"strategy": name, "mesh": dict(pipe.mesh.shape), "batch": batch,
                             "data": strategy.data_size(pipe.mesh), "shape": list(edited.shape),
                             "error": float(np.abs(edited - reference[batch]).max())})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
