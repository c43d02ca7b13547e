"""Weight-only int8 / fp8 Linears (fluxjax/models/quantize.py, models/layers.QuantizedDense).

Error bounds are set from measurements on these same fixtures (docs/quantization.md), with bf16
against float32 as the yardstick: what quantizing adds is compared with what bf16 already costs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.loading.checkpoint import flat
from fluxjax.errors import UsageError
from fluxjax.models.quantize import MODES, SCALE, dequantize, quantize_kernel

KW = dict(height=64, width=64, num_steps=4, seed=0, output="np", max_sequence_length=16)
PROMPTS = ["a red square", "a blue circle"]


def test_quantize_kernel_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 40)).astype(np.float32) * rng.uniform(0.01, 10, (1, 1, 40)).astype(np.float32)
    w[1, :, 5] = 0  # an all-zero channel
    for mode, (dtype, top) in MODES.items():
        values, scale = quantize_kernel(w, mode)
        assert values.dtype == dtype and values.shape == w.shape and scale.shape == (3, 40) and scale.dtype == np.float32
        np.testing.assert_array_equal(scale, np.where(np.abs(w).max(1) > 0, np.abs(w).max(1) / np.float32(top), 1))
        assert np.abs(values.astype(np.float32)).max() == top  # each channel's largest weight lands on the top value
        back = dequantize(values, scale)
        if mode == "int8":  # rounding to integers: within half a step of each weight
            assert np.all(np.abs(back - w) <= scale[:, None, :] * (0.5 + 1e-6))
        else:  # e4m3 keeps 3 mantissa bits: within 2^-4 of each weight (relative), or half its smallest subnormal step
            assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) * 2.0 ** -4, scale[:, None, :] * 2.0 ** -10) * 1.0001)
        assert np.all(back[1, :, 5] == 0)
        # the same quantization on the device (used to fuse a LoRA into a quantized weight)
        dv, ds = quantize_kernel(jnp.asarray(w), mode, jnp)
        np.testing.assert_array_equal(np.asarray(dv).astype(np.float32), values.astype(np.float32))
        np.testing.assert_allclose(np.asarray(ds), scale, rtol=3e-7)  # XLA may divide as a product: 1 ulp


def test_layer_and_model_error_within_measured_bounds():
    """Per Linear and whole transformer (the tiny preset, random weights), against float32.

    Measured (2026-12-05, docs/quantization.md): per Linear, bf16 1.6e-3 to 1.7e-3, int8 5.9e-3 to
    7.1e-3 (3.5x to 4.2x bf16), fp8 2.4e-2 to 2.7e-2 (14.7x to 16.2x); whole model (bf16 compute)
    against float32: bf16 5.96e-2, int8 6.16e-2 (1.03x), fp8 6.82e-2 (1.15x); against the bf16
    model: int8 1.18e-2 (0.20x bf16's own error), fp8 2.81e-2 (0.47x)."""
    from fluxjax.bench.quantization import model_errors
    from fluxjax.config import FluxConfig

    whole, layers = model_errors(FluxConfig.preset("tiny"))
    assert len(layers) == 13  # every Linear of the blocks, modulation included
    for path, row in layers.items():
        assert row["int8"] <= 5 * row["bfloat16"], (path, row)
        assert row["fp8"] <= 18 * row["bfloat16"], (path, row)
    yardstick = whole["bfloat16"]["relative"]
    bounds = {"int8": (1.1, 0.3), "fp8": (1.25, 0.6)}  # (against float32, against bf16) in units of the yardstick
    for mode, (to_f32, to_bf16) in bounds.items():
        assert whole[mode]["relative"] <= to_f32 * yardstick, (mode, whole)
        assert 1e-3 < whole[mode]["relative_to_bf16"] <= to_bf16 * yardstick, (mode, whole)  # quantization happened


@pytest.fixture(scope="module")
def tiny_images():
    """The tiny pipeline's images in float32 and bf16 (the yardstick) and with quantized weights."""
    from fluxjax.pipeline.pipeline import FluxPipeline

    out, pipes = {}, {}
    for dtype, mode in (("float32", None), ("bfloat16", None), ("float32", "int8"), ("float32", "fp8"),
                        ("bfloat16", "int8")):
        pipes[dtype, mode] = FluxPipeline.from_pretrained("tiny", dtype=dtype, quantize=mode)
        out[dtype, mode] = pipes[dtype, mode](PROMPTS, **KW)
    return out, pipes


@pytest.mark.slow
def test_pipeline_holds_quantized_weights_and_changes_the_image_within_bounds(tiny_images):
    """Measured (2026-12-05): bf16 vs float32 max pixel error 0.073; float32 compute with int8 weights
    0.011 (0.15x), with fp8 weights 0.046 (0.64x); bf16 compute with int8 weights 0.068 vs float32."""
    images, pipes = tiny_images
    for (dtype, mode), pipe in pipes.items():
        for name in ("transformer", "t5"):
            leaves = flat(getattr(pipe, name).params)
            quantized = {p: v for p, v in leaves.items() if p.endswith("/kernel") and p[:-6] + SCALE in leaves}
            assert bool(quantized) == (mode is not None), (name, mode)
            for p, v in quantized.items():
                assert isinstance(v, jax.Array) and v.dtype == MODES[mode][0], (name, p, v.dtype)
                assert leaves[p[:-6] + SCALE].dtype == jnp.float32
        if mode is not None:  # the embedders and the final layer stay in the pipeline's dtype
            t = pipe.transformer.params
            assert t["img_in"]["kernel"].dtype == t["final_layer"]["linear"]["kernel"].dtype == jnp.dtype(dtype)
            assert t["time_in"]["in_layer"]["kernel"].dtype == jnp.dtype(dtype) and SCALE not in t["txt_in"]
    ref = images["float32", None]
    yardstick = np.abs(images["bfloat16", None] - ref).max()
    int8, fp8 = (np.abs(images["float32", m] - ref).max() for m in MODES)
    assert 1e-3 < int8 <= 0.3 * yardstick and 1e-3 < fp8 <= yardstick, (int8, fp8, yardstick)
    assert np.abs(images["bfloat16", "int8"] - ref).max() <= 1.1 * yardstick


def test_quantize_is_refused_in_one_line():
    from fluxjax.config import AutoEncoderConfig
    from fluxjax.loading.registry import build
    from fluxjax.pipeline.pipeline import FluxPipeline

    with pytest.raises(UsageError) as e:
        FluxPipeline.from_pretrained("tiny", quantize="int4")
    assert str(e.value) == "quantize='int4': choose int8 or fp8 (weight-only, per output channel), or leave it out"
    with pytest.raises(TypeError, match="^vae: no setting quantize"):  # only the transformer and T5 take it
        build("vae", AutoEncoderConfig.preset("tiny"), quantize="int8")


def test_cli_quantize_flag(tmp_path, capsys):
    from fluxjax.commands.cli import main

    out = tmp_path / "q.png"
    assert main(["generate", "a red square", "--model", "tiny", "--quantize", "int8", "--height", "32", "--width", "32",
                 "--steps", "1", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--model", "tiny", "--quantize", "int4", "--out", str(tmp_path / "no.png")])
    assert e.value.code == 2 and "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
    for command in (["edit", "x.png", "--source-prompt", "a", "--target-prompt", "b"], ["batch", "p.txt", "--out-dir", "o"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--quantize", "int4"])
        assert e.value.code == 2 and "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
    assert main(["plan", "--devices", "1", "--quantize", "int8", "--train"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--quantize plans sampling: training keeps float32 master weights (leave out --train)")
    assert main(["plan", "--devices", "1", "--quantize", "int8", "--no-xla"]) == 0
    out = capsys.readouterr().out  # dev's parameter bytes with int8 Linears (docs/quantization.md)
    assert "11.981 GB" in out and "4.898 GB" in out, out


@pytest.mark.slow
def test_lora_live_and_fused_on_quantized_weights(tmp_path, tiny_images):
    """Live: the LoRA's branch is added to the quantized Linear's output. Fused: each kernel is
    quantized again with the update in, within one quantization step of base + update."""
    from fluxjax.lora import adapters as lora, fused as lora_fused
    from fluxjax.bench.lora import write_random_lora
    from fluxjax.pipeline.pipeline import FluxPipeline

    images, _ = tiny_images
    path = str(tmp_path / "lora.safetensors")
    write_random_lora(path, FluxPipeline.from_pretrained("tiny", dtype="float32").transformer.model.config, 4)
    base = FluxPipeline.from_pretrained("tiny", dtype="float32", quantize="int8")
    live = FluxPipeline.from_pretrained("tiny", dtype="float32", quantize="int8")
    live.load_lora([(path, 0.8)])
    fused = FluxPipeline.from_pretrained("tiny", dtype="float32", quantize="int8", loras=[(path, 0.8)], fuse=True)
    adapters = lora.load_loras([path], base.transformer.model.config, base.transformer.params)
    b, f = flat(base.transformer.params), flat(fused.transformer.params)
    checked = 0
    for p, node in flat(adapters.tree).items():
        if not p.endswith("/a"):
            continue
        layer = p[: -len("/a")]
        if layer + "/" + SCALE not in b:
            continue
        factors = [flat(adapters.tree)[f"{layer}/{k}"] for k in ("a", "b", "scale")]
        base_kernel = dequantize(b[layer + "/kernel"], b[layer + "/" + SCALE])
        want = np.asarray(lora_fused._fused_kernel(base_kernel, *factors, np.float32([0.8])))
        assert f[layer + "/kernel"].dtype == jnp.int8
        got = dequantize(f[layer + "/kernel"], f[layer + "/" + SCALE])
        step = np.asarray(f[layer + "/" + SCALE])[..., None, :]
        assert np.all(np.abs(got - want) <= step * 0.5 + 1e-6), layer
        checked += 1
    assert checked >= 10
    ref = images["float32", "int8"]
    with_live, with_fused = live(PROMPTS, **KW), fused(PROMPTS, **KW)
    effect = np.abs(with_live - ref).max()
    # fused differs from live by the requantization of the updated weights only
    assert effect > 1e-2 and np.abs(with_fused - with_live).max() <= 0.5 * effect


def test_loader_quantizes_a_checkpoint_on_the_host(tmp_path):
    """From a hub folder and from the Orbax folder `fluxjax convert` writes: each quantized kernel
    is exactly the host quantization of the bf16 weight the unquantized load gives, the rest equal."""
    from fluxjax.commands.cli import main
    from fluxjax.loading.registry import load
    from fluxjax.testing.reference import make_hub_pipeline

    make_hub_pipeline(tmp_path / "hub", "schnell")
    assert main(["convert", str(tmp_path / "hub"), str(tmp_path / "orbax")]) == 0
    cases = [(c, root / f) for root in (tmp_path / "hub", tmp_path / "orbax")
             for c, f in (("transformer", "transformer"), ("t5", "text_encoder_2"))]
    for component, folder in cases:
        _, plain = load(component, folder, "bfloat16")
        _, quant = load(component, folder, "bfloat16", quantize="fp8")
        p, q = flat(plain), flat(quant)
        assert set(q) - set(p) == {k for k in q if k.endswith("/" + SCALE)} and set(p) <= set(q)
        for key, value in p.items():
            if key[: -len("kernel")] + SCALE in q:
                values, scale = quantize_kernel(np.asarray(value), "fp8")
                np.testing.assert_array_equal(np.asarray(q[key]).astype(np.float32), values.astype(np.float32))
                np.testing.assert_array_equal(np.asarray(q[key[: -len("kernel")] + SCALE]), scale)
            else:
                np.testing.assert_array_equal(np.asarray(q[key]), np.asarray(value))


def test_program_inputs_give_quantized_abstract_params():
    """`fluxjax plan --topology --quantize` compiles the pipeline's programs with int8 parameters."""
    from fluxjax.plan.tpu import program_inputs
    from fluxjax.parallel.strategies import Strategy

    strategy = Strategy.load("fsdp")
    mesh = strategy.make_mesh(jax.devices()[:1])
    built = program_inputs("tiny", strategy, mesh, 1, 64, 64, 16, quantize="int8")
    for program, component in (("denoise", 1), ("encode", 1)):
        leaves = flat(built[program][1][component])
        kernels = [p for p in leaves if p.endswith("/" + SCALE)]
        assert kernels and all(leaves[p[: -len(SCALE)] + "kernel"].dtype == jnp.int8 for p in kernels), program


def test_batch_records_quantize_and_keeps_one_setting_per_folder(tmp_path, capsys):
    """The weights' quantization changes the pixels, so `fluxjax batch` records it with each image
    and refuses to resume a folder with another; manifests written before it existed read as none."""
    from fluxjax.commands.cli import main

    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a red square\na blue circle\n")
    args = ["batch", str(prompts), "--out-dir", str(out), "--model", "tiny", "--height", "32", "--width", "32",
            "--steps", "1"]
    manifest = out / "manifest-00000.jsonl"
    assert main([*args, "--quantize", "int8"]) == 0
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["quantize"] for r in records] == ["int8", "int8"]
    (out / records[1]["name"]).unlink()
    manifest.write_text(json.dumps(records[0]) + "\n")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fluxjax batch: error: 000000.png in the output folder was made with quantize 'int8', this run's is 'none'; an "
        "image's pixels depend on it, so resume with the same settings or use a new --out-dir")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    old = {k: v for k, v in records[0].items() if k != "quantize"}  # a manifest from before the setting
    manifest.write_text(json.dumps(old) + "\n")
    assert main(args) == 0
    assert json.loads(manifest.read_text().splitlines()[-1])["quantize"] == "none"


def test_convert_quantize_int8_stores_and_restores_what_load_time_quantization_holds(tmp_path, capsys):
    """`fluxjax convert --quantize int8`: the transformer's and T5's folders record int8 and hold the
    int8 values and scales that quantizing at load time gives (leaf for leaf),
    so the pipeline restored from it makes the same pixels; fewer bytes than the bf16 conversion;
    loading it otherwise, or quantizing a folder without a transformer or T5, is a one-line error."""
    from fluxjax.commands.cli import main
    from fluxjax.loading.checkpoint import MARKER
    from fluxjax.loading.registry import load
    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.testing.reference import make_hub_pipeline

    hub, plain, quant = tmp_path / "hub", tmp_path / "bf16", tmp_path / "int8"
    make_hub_pipeline(hub, "schnell")
    assert main(["convert", str(hub), str(plain)]) == 0
    assert main(["convert", str(hub), str(quant), "--quantize", "int8"]) == 0
    for folder, held in (("transformer", "int8"), ("text_encoder_2", "int8"), ("vae", None), ("text_encoder", None)):
        assert json.loads((quant / folder / MARKER).read_text()).get("quantize") == held, folder
    for component, folder in (("transformer", "transformer"), ("t5", "text_encoder_2")):
        _, at_load = load(component, hub / folder, "bfloat16", quantize="int8")
        _, stored = load(component, quant / folder, "bfloat16", quantize="int8")
        a, s = flat(at_load), flat(stored)
        assert set(a) == set(s) and any(k.endswith("/" + SCALE) for k in s), component
        for key in a:
            assert s[key].dtype == a[key].dtype, key
            np.testing.assert_array_equal(np.asarray(s[key]), np.asarray(a[key]), err_msg=key)
    kw = dict(KW, height=32, width=32, num_steps=2)
    images = [FluxPipeline.from_pretrained(str(path), dtype="bfloat16", quantize="int8")("a red square", **kw)
              for path in (hub, quant)]
    np.testing.assert_array_equal(images[1], images[0])

    def du(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    # Measured (2026-12-05, this tiny fixture): transformer params/ 186,657 to 196,560 bytes (Orbax's metadata
    # varies) -> 151,394; T5 about 105,000 -> 103,000. The leaves are small, so Orbax's per-leaf metadata
    # (one more leaf per scale) is much of a folder; at full size the Linears are nearly all of it
    # (docs/quantization.md: 23.80 -> 11.98 GB, 9.53 -> 4.90 GB).
    sizes = {name: (du(plain / name / "params"), du(quant / name / "params")) for name in ("transformer", "text_encoder_2")}
    print("params bytes (bf16, int8):", sizes)
    assert all(q < b for b, q in sizes.values()), sizes

    for mode in (None, "fp8"):
        with pytest.raises(ValueError) as e:
            load("transformer", quant / "transformer", "bfloat16", quantize=mode)
        assert "\n" not in str(e.value) and str(e.value).startswith(
            f"{quant / 'transformer'}: holds int8-quantized weights (fluxjax convert --quantize int8); "
            f"load it with quantize='int8' (--quantize int8), not {mode!r}"), str(e.value)
    capsys.readouterr()
    assert main(["convert", str(hub / "vae"), str(tmp_path / "vae"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--quantize int8: {hub / 'vae'} holds no transformer or T5 (the models fluxjax " \
        f"quantizes) ({tmp_path / 'vae'} not created)" in err, err
    assert not (tmp_path / "vae").exists()
