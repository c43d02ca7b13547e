"""Fill (in_channels 384) and structural control (128) against diffusers' FluxFillPipeline and
FluxControlPipeline, and BFL's control LoRAs on a base model against FluxControlPipeline +
load_lora_weights.

Each reference is diffusers' own pipeline on a small random hub folder it saved itself
(fluxjax/testing/reference.py), run from the same noise (`latents=`). Same encoded latents: both
pipelines sample the VAE posterior (`latent_dist.sample(generator)`), fluxjax encodes with the
posterior mean (BFL's choice); the reference's `DiagonalGaussianDistribution.sample` is patched to
return that mean, so both sides condition on the same latents. Limit: pixels on [0, 1] within
1e-3 in float32, as the text-to-image pipeline (tests/test_pipeline.py).
"""

import os
import types

import numpy as np
import pytest

import torch
import peft  # noqa: F401 (diffusers' LoRA loading needs it; the test extra installs it)

from diffusers import FluxControlPipeline, FluxFillPipeline  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fluxjax.pipeline import conditioning  # noqa: E402
from fluxjax.errors import UsageError  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402
from test_lora import control_norm_scales  # noqa: E402

HEIGHT, WIDTH = 48, 80
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH, STEPS, GUIDANCE = 32, 3, 3.5


@pytest.fixture(scope="module", autouse=True)
def posterior_mean():
    """diffusers' VAE posterior sample -> its mean, the latents fluxjax conditions on (module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
        yield


def random_image(seed, height=HEIGHT, width=WIDTH):
    """A smooth random RGB image (PIL): blocks of colour plus noise, like a photo more than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8, width // 8, 3))
    pixels = np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def random_mask(seed):
    """A grey-level mask image (PIL "L"): a rectangle to repaint, with values either side of 128."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 120, (HEIGHT, WIDTH)).astype(np.uint8)
    mask[8:40, 16:56] = rng.integers(130, 256, (32, 40))
    return Image.fromarray(mask)


def make(tmp_path_factory, name, pipeline_class, **transformer):
    root = tmp_path_factory.mktemp(name)
    reference = make_hub_pipeline(root, "dev", pipeline_class=pipeline_class, **transformer)
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    return types.SimpleNamespace(root=root, reference=reference, noise=noise, pipe=FluxPipeline.from_pretrained(root, dtype="float32"))


def packed(noise):
    return FluxFillPipeline._pack_latents(noise, noise.shape[0], 16, HEIGHT // 8, WIDTH // 8)


def reference_images(hub, **kw):
    with torch.no_grad():
        return hub.reference(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                             latents=packed(hub.noise), max_sequence_length=T5_LENGTH, guidance_scale=GUIDANCE,
                             output_type="np", **kw).images


def ours(hub, pipe=None, **kw):
    return (pipe or hub.pipe)(PROMPTS, num_steps=STEPS, guidance=GUIDANCE, latents=hub.noise.numpy(),
                              max_sequence_length=T5_LENGTH, output="np", **kw)


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return make(tmp_path_factory, "hub_fill", FluxFillPipeline, in_channels=384, out_channels=64)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return make(tmp_path_factory, "hub_control", FluxControlPipeline, in_channels=128, out_channels=64)


def test_variants_read_from_checkpoint(fill, control):
    assert (fill.pipe.variant, control.pipe.variant) == ("fill", "control")
    assert (fill.pipe.defaults.num_steps, fill.pipe.defaults.guidance) == (50, 30.0)  # FluxFillPipeline's
    with pytest.raises(UsageError, match=r"variant='kontext', but .*transformer has 384 input channels, a fill model"):
        FluxPipeline.from_pretrained(fill.root, dtype="float32", variant="kontext")


def test_fill_channels_match_diffusers(fill):
    """The 320 extra features (masked-image latents, packed mask) equal FluxFillPipeline's."""
    image, mask = random_image(1), random_mask(2)
    ref = fill.reference
    init = ref.image_processor.preprocess(image, height=HEIGHT, width=WIDTH).float()
    mask_t = ref.mask_processor.preprocess(mask, height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        m, latents = ref.prepare_mask_latents(mask_t, init * (1 - mask_t), 1, 16, 1, HEIGHT, WIDTH, torch.float32,
                                              "cpu", None)
    want = torch.cat((latents, m), dim=-1).numpy()
    host = {"fill_pixels": conditioning.to_model_pixels(np.asarray(image)[None]),
            "fill_mask": conditioning.load_mask(mask, (HEIGHT, WIDTH))[None]}
    got = np.asarray(conditioning.encode_variant(fill.pipe.vae.model, fill.pipe.vae.params, host)["channels"])
    assert got.shape == want.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 320)
    np.testing.assert_array_equal(got[..., 64:], want[..., 64:])  # the packed mask, exactly
    np.testing.assert_allclose(got[..., :64], want[..., :64], atol=1e-4)


def test_fill_matches_diffusers(fill):
    image, mask = random_image(3), random_mask(4)
    want = reference_images(fill, image=image, mask_image=mask)
    got = ours(fill, image=image, mask_image=mask)
    assert got.shape == want.shape == (len(PROMPTS), HEIGHT, WIDTH, 3)
    assert np.abs(got - want).max() <= 1e-3
    # The mask matters: repainting another region gives another image.
    other = ours(fill, image=image, mask_image=Image.fromarray(255 - np.asarray(mask)))
    assert np.abs(other - got).max() > 1e-2


def test_control_matches_diffusers(control):
    hint = random_image(5)
    want = reference_images(control, control_image=hint)
    got = ours(control, control_image=hint)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(ours(control, control_image=random_image(6)) - got).max() > 1e-2


# --- BFL control LoRAs on a base model ---------------------------------------------------------


def control_lora_tensors(transformer, seed, rank=4):
    """A BFL control LoRA as FLUX.1-Canny/Depth-dev-lora lays it out: BFL names, lora_A/lora_B with
    lora_B.bias, img_in widened to 128 inputs, and full QK-norm scales."""
    gen = torch.Generator().manual_seed(seed)
    cfg, d = transformer.config, transformer.inner_dim
    linears = [("img_in", d, 128), ("final_layer.linear", 64, d)]
    linears += [(f"double_blocks.{i}.{s}_attn.qkv", 3 * d, d) for i in range(cfg.num_layers) for s in ("img", "txt")]
    linears += [(f"double_blocks.{i}.img_mlp.0", 4 * d, d) for i in range(cfg.num_layers)]
    linears += [(f"single_blocks.{j}.linear1", 7 * d, d) for j in range(cfg.num_single_layers)]
    tensors = {}
    for name, o, i in linears:
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i**0.5
        tensors[f"{name}.lora_B.weight"] = 0.5 * torch.randn(o, rank, generator=gen) / rank**0.5
        tensors[f"{name}.lora_B.bias"] = 0.1 * torch.randn(o, generator=gen)
    tensors.update(control_norm_scales(cfg, gen))
    return tensors


def bfl_control_to_diffusers(tensors, transformer):
    """The same LoRA in diffusers' names, as its `_convert_bfl_flux_control_lora_to_diffusers` writes
    them; that function is written for FLUX.1's 19/38 blocks of width 3072 only, so the small model's
    file is converted here, module by module, and given to `load_lora_weights` as a dict."""
    d = transformer.inner_dim
    out = {}

    def split(bfl, parts, sizes):
        a, b, bias = (tensors[f"{bfl}.lora_{x}"] for x in ("A.weight", "B.weight", "B.bias"))
        for part, rows, shift in zip(parts, torch.split(b, sizes), torch.split(bias, sizes)):
            out[f"transformer.{part}.lora_A.weight"], out[f"transformer.{part}.lora_B.weight"] = a, rows
            out[f"transformer.{part}.lora_B.bias"] = shift

    split("img_in", ["x_embedder"], [d])
    split("final_layer.linear", ["proj_out"], [64])
    for i in range(transformer.config.num_layers):
        block = f"transformer_blocks.{i}"
        split(f"double_blocks.{i}.img_attn.qkv", [f"{block}.attn.to_{x}" for x in "qkv"], [d] * 3)
        split(f"double_blocks.{i}.txt_attn.qkv", [f"{block}.attn.add_{x}_proj" for x in "qkv"], [d] * 3)
        split(f"double_blocks.{i}.img_mlp.0", [f"{block}.ff.net.0.proj"], [4 * d])
        for s, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[f"transformer.{block}.attn.{q}.weight"] = tensors[f"double_blocks.{i}.{s}_attn.norm.query_norm.scale"]
            out[f"transformer.{block}.attn.{k}.weight"] = tensors[f"double_blocks.{i}.{s}_attn.norm.key_norm.scale"]
    for j in range(transformer.config.num_single_layers):
        block = f"single_transformer_blocks.{j}"
        split(f"single_blocks.{j}.linear1", [f"{block}.attn.to_{x}" for x in "qkv"] + [f"{block}.proj_mlp"], [d] * 3 + [4 * d])
        out[f"transformer.{block}.attn.norm_q.weight"] = tensors[f"single_blocks.{j}.norm.query_norm.scale"]
        out[f"transformer.{block}.attn.norm_k.weight"] = tensors[f"single_blocks.{j}.norm.key_norm.scale"]
    return out


def test_flowedit_is_refused_on_fill_and_control_models(fill, control, tmp_path, capsys, monkeypatch):
    """N90: FlowEdit on a Fill or control checkpoint is one line (the library's) and, from `fluxjax
    edit`, before loading (read from the transformer's config), not a shape error mid-edit."""
    from fluxjax.commands import cli

    src = tmp_path / "in.png"
    random_image(0).save(src)
    needs = {"fill": "a masked image and a mask", "control": "a control image"}
    for hub in (fill, control):
        with pytest.raises(UsageError) as e:
            hub.pipe.edit(str(src), "a", "b", num_steps=2)
        assert str(e.value) == (f"FlowEdit runs on plain text-to-image models (FLUX.1-dev, -schnell, Kontext); "
                                f"{hub.pipe.name} is a {hub.pipe.variant} model, whose transformer also needs "
                                f"{needs[hub.pipe.variant]}")
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    capsys.readouterr()
    out = tmp_path / "out.png"
    for hub in (fill, control):
        assert cli.main(["edit", str(src), "--model", str(hub.root), "--source-prompt", "a", "--target-prompt", "b",
                         "--out", str(out)]) == 2
        variant = hub.pipe.variant
        assert capsys.readouterr().err.strip().splitlines() == [
            f"fluxjax edit: error: FlowEdit runs on plain text-to-image models (FLUX.1-dev, -schnell, Kontext); "
            f"{hub.root} is a {variant} model, whose transformer also needs {needs[variant]}"]
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


@pytest.fixture(scope="module")
def control_lora(tmp_path_factory):
    """A base dev hub (saved as a FluxControlPipeline), a control LoRA file, diffusers' images with it."""
    hub = make(tmp_path_factory, "hub_control_lora", FluxControlPipeline)
    tensors = control_lora_tensors(hub.reference.transformer, seed=7)
    hub.lora = os.path.join(hub.root, "canny-lora.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, hub.lora)
    hub.reference.load_lora_weights(bfl_control_to_diffusers(tensors, hub.reference.transformer))
    assert hub.reference.transformer.config.in_channels == 128  # diffusers widened x_embedder
    hub.hint = random_image(8)
    hub.images = reference_images(hub, control_image=hub.hint)
    return hub


def test_control_lora_fused_matches_diffusers(control_lora):
    assert control_lora.pipe.variant == "base"
    pipe = FluxPipeline.from_pretrained(control_lora.root, dtype="float32", loras=[control_lora.lora])
    assert pipe.variant == "control" and pipe.transformer.model.config.in_channels == 128
    assert np.abs(ours(control_lora, pipe, control_image=control_lora.hint) - control_lora.images).max() <= 1e-3


def test_control_lora_live_matches_diffusers(control_lora):
    pipe = FluxPipeline.from_pretrained(control_lora.root, dtype="float32")
    pipe.load_lora(control_lora.lora, fuse=False)
    assert pipe.variant == "control"
    assert np.abs(ours(control_lora, pipe, control_image=control_lora.hint) - control_lora.images).max() <= 1e-3
    pipe.unload_lora()  # a base model again
    assert pipe.variant == "base" and pipe.transformer.model.config.in_channels == 64
    assert pipe.transformer.params["img_in"]["kernel"].shape[0] == 64


def test_refused_inputs(fill, control):
    """Each wrong use of Fill and control inputs is refused in one line before any work."""
    image, mask = random_image(9), random_mask(10)
    small_mask = Image.fromarray(np.asarray(mask)[:32])
    cases = [
        (fill.pipe, dict(image=image), r"a Fill model needs image= and mask_image=; hub_fill\d* is a fill model \(white"),
        (fill.pipe, dict(mask_image=mask), r"a Fill model needs image= and mask_image="),
        (fill.pipe, dict(image=image, mask_image=small_mask), r"mask_image is 80x32 but the image is 80x48"),
        (fill.pipe, dict(image=image, mask_image=mask, control_image=image), r"control_image needs a FLUX.1 Control checkpoint; hub_fill\d* is a fill model"),
        (control.pipe, dict(), r"a control model needs control_image=; hub_control\d* is a control model"),
        (control.pipe, dict(control_image=image, mask_image=mask), r"mask_image is for inpainting with a base or Fill model; hub_control\d* is a control model"),
        (control.pipe, dict(control_image=image, reference_images=[image]), r"reference_images needs a FLUX.1 Kontext checkpoint; hub_control\d* is a control model "
         r"\(or a base model with allow_references=True\)"),
        (control.pipe, dict(control_image=random_image(11, 40, 80)), r"control_image is 80x40, not a multiple of 16"),
        (control.pipe, dict(control_image=image, height=32), r"image is 80x48, not height=32"),
    ]
    for pipe, kw, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            pipe(PROMPTS[0], num_steps=1, output="np", **kw)
        assert "\n" not in str(e.value)
