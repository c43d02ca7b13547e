"""The quantized tiny pipeline (int8, fp8) under fsdp on 8 simulated CPU devices: the one-device
image, and each quantized kernel and its scale laid out as the unquantized Linear's kernel and bias."""

import numpy as np
import pytest

from fluxjax.loading.checkpoint import flat
from fluxjax.models.quantize import MODES
from fluxjax.pipeline.pipeline import FluxPipeline

pytestmark = pytest.mark.slow  # minutes of compiles on a loaded CPU: outside the fast tier

PROMPTS = ["a red square", "a blue circle", "a green triangle"]  # 3: padded to the 8 data shards
KW = dict(height=32, width=48, num_steps=2, seed=0, max_sequence_length=16, output="np")


def spec(x) -> list:
    return [list(d) if isinstance(d, tuple) else d for d in x.sharding.spec]


def linears(pipe, plain) -> dict:
    out = {}
    for name in ("transformer", "t5"):
        q, p = flat(getattr(pipe, name).params), flat(getattr(plain, name).params)
        for path in q:
            if path.endswith("/kernel_scale"):
                base = path[: -len("kernel_scale")]
                out[f"{name}:{base}"] = dict(
                    dtype=str(q[base + "kernel"].dtype), scale_dtype=str(q[path].dtype),
                    kernel_spec=spec(q[base + "kernel"]), plain_kernel_spec=spec(p[base + "kernel"]),
                    scale_spec=spec(q[path]), plain_bias_spec=spec(p[base + "bias"]) if base + "bias" in p else None,
                    kernel_shard=list(q[base + "kernel"].addressable_shards[0].data.shape),
                    kernel_shape=list(q[base + "kernel"].shape))
    return out


def test_fsdp_on_8_devices_equals_one_device_and_splits_weights_and_scales():
    """The fsdp pipeline with int8 / fp8 weights equals the one-device pipeline within 1e-5
    (float32; measured 1.3e-6 / 1.5e-6), and with int8 and its T5 and CLIP on the host CPU
    (residency="host") the all-on-the-mesh pipeline within the same bound (measured 1.6e-6: the
    encoders on one device against 8 shards), each quantized kernel is int8 / fp8 and laid out as the
    unquantized kernel, and its scale as the Linear's bias (the kernel's output axis)."""
    plain = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp")
    for mode in MODES:
        single = FluxPipeline.from_pretrained("tiny", dtype="float32", quantize=mode)
        pipe = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp", quantize=mode)
        reference, images = single(PROMPTS, **KW), pipe(PROMPTS, **KW)
        error = float(np.abs(images - reference).max())
        assert error < 1e-5 * float(np.abs(reference).max()), (mode, error)
        if mode == "int8":  # T5 and CLIP on the host CPU (residency="host"): the pixels of all on the mesh
            hosted = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp", quantize=mode,
                                                  residency="host")
            moved = float(np.abs(hosted(PROMPTS, **KW) - images).max())
            assert moved < 1e-5 * float(np.abs(reference).max()), moved
        found = linears(pipe, plain)
        assert len(found) == 13 + 7  # the transformer's block Linears and T5's
        for name, lin in found.items():
            assert lin["dtype"] == str(np.dtype(MODES[mode][0])) and lin["scale_dtype"] == "float32", name
            assert lin["kernel_spec"] == lin["plain_kernel_spec"] and "fsdp" in lin["kernel_spec"], name
            assert np.prod(lin["kernel_shard"]) * 8 == np.prod(lin["kernel_shape"]), name
            assert lin["scale_spec"] == [None, "fsdp"], name
            if lin["plain_bias_spec"] is not None:
                assert lin["scale_spec"] == lin["plain_bias_spec"], name
