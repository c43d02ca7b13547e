"""FLUX.2 [klein] generation against diffusers' Flux2KleinPipeline: pixels of a tiny random hub
folder, distilled (no CFG) and base (true CFG against ""), two sizes, two prompts, one and two
reference images; FluxPipeline.from_pretrained's dispatch; the schedule; refused arguments; the
same folder under a sharding strategy on 8 simulated devices against one device (`sharded`,
also used by test_flux2_inpaint and test_flux2_dev_pipeline).

The folder is what Flux2KleinPipeline.save_pretrained writes for small random components built
with diffusers' and transformers' own classes (Flux2Transformer2DModel, AutoencoderKLFlux2,
Qwen3ForCausalLM with 28 layers so the default hidden states 9, 18, 27 exist) and a Qwen2-style
tokenizer made locally (fluxjax.pipeline.qwen3_tokenizer.make_tokenizer); nothing is downloaded.
"""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image

from fluxjax.commands import cli
from fluxjax.errors import UsageError
from fluxjax.parallel.strategies import Strategy
from fluxjax.pipeline.flux2 import Flux2Pipeline
from fluxjax.pipeline.outputs import to_uint8
from fluxjax.pipeline.pipeline import FluxPipeline
from fluxjax.pipeline.qwen3_tokenizer import make_tokenizer
from fluxjax.sampling import sampler as sampling
from fluxjax.testing.reference import randomize_

# fp32 pixels in [0, 1], the acceptance bound.
PIXEL_TOL = 1e-3
# fp32 pixels under a sharding strategy against one device, the bound for sharded runs.
SHARDED_TOL = 1e-5
PROMPTS = ["a red cube on a blue floor", "two small green spheres under a lamp, seen from above"]
SIZES = [(32, 48), (48, 32)]  # (H, W): not square, both ways round
LENGTH = 64  # text tokens (klein's 512 also works; 64 keeps diffusers' CPU run short)
QWEN = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
TRANSFORMER = dict(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=3 * QWEN["hidden_size"], mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                   guidance_embeds=False)
VAE = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=32,
           sample_size=64, batch_norm_eps=1e-4)
# klein's scheduler_config.json (diffusers passes mu = compute_empirical_mu to it)
SCHEDULER = dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, time_shift_type="exponential")


def _components(root):
    make_tokenizer(root / "tok")
    tokenizer = transformers.Qwen2TokenizerFast.from_pretrained(root / "tok")
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=len(tokenizer), **QWEN)).eval()
    randomize_(qwen, 0)
    transformer = Flux2Transformer2DModel(**TRANSFORMER).eval()
    randomize_(transformer, 1)
    vae = AutoencoderKLFlux2(**VAE).eval()
    randomize_(vae, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so a missing normalisation shows
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(torch.exp(0.3 * torch.randn(vae.bn.running_var.shape, generator=g)))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=qwen,
                tokenizer=tokenizer, transformer=transformer)


@pytest.fixture(scope="module", params=["distilled", "base"])
def klein(request, tmp_path_factory):
    """The diffusers pipeline and fluxjax's, float32, from one saved folder."""
    root = tmp_path_factory.mktemp(f"klein_{request.param}")
    ref = Flux2KleinPipeline(**_components(root), is_distilled=request.param == "distilled")
    ref.save_pretrained(root / "hub")
    pipe = FluxPipeline.from_pretrained(root / "hub", dtype="float32", attention_impl="xla")
    return types.SimpleNamespace(ref=ref, pipe=pipe, root=root / "hub", distilled=request.param == "distilled")


def _latents(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 128, height // 16, width // 16, generator=g)


def _compare(k, prompt, height, width, steps, ours: dict, theirs: dict, seed=0, length=LENGTH):
    """max |pixel error| of fluxjax against diffusers on the same latents; length None: the
    pipelines' default (512 text tokens)."""
    batch = len(prompt) if isinstance(prompt, list) else 1
    latents = _latents(batch, height, width, seed)
    text = {} if length is None else {"max_sequence_length": length}
    with torch.no_grad():
        want = k.ref(prompt=prompt, height=height, width=width, num_inference_steps=steps, latents=latents,
                     output_type="np", **text, **theirs).images
    got = k.pipe(prompt, height, width, num_steps=steps, latents=latents.numpy(), output="np", **text, **ours)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    print(f"{'distilled' if k.distilled else 'base'} {width}x{height} batch {batch} {steps} steps "
          f"{length or 512} tokens {sorted(ours)}: max |pixel error| {err:.2e} (pixels std {want.std():.3f})")
    assert want.std() > 0.02  # a real image, not a flat one
    k.last = got
    return err


def test_dispatch(klein):
    assert isinstance(klein.pipe, Flux2Pipeline)
    assert klein.pipe.is_distilled == klein.distilled
    index = json.loads((klein.root / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert klein.pipe.defaults.num_steps == (4 if klein.distilled else 50)


@pytest.mark.parametrize("size", SIZES)
def test_text_to_image_matches_diffusers(klein, size):
    height, width = size
    length = LENGTH if size == SIZES[0] else None  # the second size at klein's 512 tokens
    if klein.distilled:  # diffusers ignores guidance_scale for a distilled model
        err = _compare(klein, PROMPTS, height, width, 4, {}, {}, length=length)
    else:  # base: CFG at diffusers' default guidance_scale 4 against ""
        err = _compare(klein, PROMPTS, height, width, 3, {}, {"guidance_scale": 4.0}, length=length)
        text = {} if length is None else {"max_sequence_length": length}
        plain = klein.pipe(PROMPTS, height, width, num_steps=3, latents=_latents(2, height, width).numpy(),
                           output="np", true_cfg_scale=1.0, **text)
        assert np.abs(plain - klein.last).max() > 10 * PIXEL_TOL  # CFG does change the image
    assert err < PIXEL_TOL


def test_base_cfg_scale_and_off(klein):
    if klein.distilled:
        with pytest.raises(UsageError, match="distilled"):
            klein.pipe(PROMPTS[0], 32, 32, num_steps=1, true_cfg_scale=3.0, output="np")
        return
    assert _compare(klein, PROMPTS[1], 32, 48, 2, {"true_cfg_scale": 2.5}, {"guidance_scale": 2.5}) < PIXEL_TOL
    # true_cfg_scale 1 is diffusers' guidance_scale 1: no negative pass
    assert _compare(klein, PROMPTS[0], 48, 32, 2, {"true_cfg_scale": 1.0}, {"guidance_scale": 1.0}) < PIXEL_TOL


def _reference_images():
    rng = np.random.default_rng(0)
    # 80x72 is not a multiple of 16: both pipelines centre-crop it to 64x64
    return [Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 96, 3), np.uint8))]


@pytest.mark.parametrize("count", [1, 2])
def test_reference_images_match_diffusers(klein, count):
    images = _reference_images()[:count]
    image = images[0] if count == 1 else images
    extra = {} if klein.distilled else {"guidance_scale": 4.0}
    prompt = PROMPTS[0] if count == 1 else PROMPTS  # two references shared by a batch of two
    err = _compare(klein, prompt, 32, 48, 2, {"image": image}, {"image": image, **extra})
    assert err < PIXEL_TOL
    with_references = klein.last
    batch = 1 if count == 1 else 2
    plain = klein.pipe(prompt, 32, 48, num_steps=2, latents=_latents(batch, 32, 48).numpy(), output="np",
                       max_sequence_length=LENGTH)
    assert np.abs(plain - with_references).max() > 10 * PIXEL_TOL  # the references do change the image (measured: 0.08)


def sharded(root, name: str, ici: tuple[int, ...]) -> Flux2Pipeline:
    """The pipeline of hub folder `root` as the fixtures load it (float32, XLA attention) under
    strategy `name` on an `ici` mesh of the 8 simulated devices (tests/conftest.py)."""
    pipe = FluxPipeline.from_pretrained(root, dtype="float32", attention_impl="xla",
                                        sharding=Strategy.load(name).with_ici(*ici))
    assert isinstance(pipe, Flux2Pipeline) and pipe.mesh.size == 8
    return pipe


def sharded_error(single, pipe, what: str, **call) -> float:
    """max |pixel error| of `pipe(**call)` (sharded) against `single(**call)` (one device, its
    executable compiled by the test of the same call before), float32 output; printed."""
    want, got = single(**call, output="np"), pipe(**call, output="np")
    assert got.shape == want.shape and want.std() > 0.02
    err = float(np.abs(got - want).max())
    print(f"{what} under {pipe.strategy.name} {dict(pipe.mesh.shape)}: max |pixel error| against one device {err:.1e}")
    return err


# One strategy per klein (the sharded compiles are most of the time): fsdp over 8 on the distilled
# one, tp over data 4 x tensor 2 (the tiny transformer's 2 heads split) on the base one (true CFG).
SHARDED = {"distilled": ("fsdp", (8,)), "base": ("tp", (4, 2))}


@pytest.mark.slow
def test_sharded_reference_image_gives_the_single_device_image(klein, tmp_path):
    """test_reference_images_match_diffusers' one-reference call (batch 1, padded to the data
    size; 64 text + 6 image + 16 reference tokens), and for the distilled klein the same through
    `fluxjax generate --sharding fsdp`: the PNG of the sharded call."""
    name, ici = SHARDED["distilled" if klein.distilled else "base"]
    pipe = sharded(klein.root, name, ici)
    qkv = pipe.transformer.params["double_blocks"]["img_attn"]["qkv"]["kernel"]  # (layers, embed, qkv)
    layers, embed, width = qkv.shape
    assert qkv.sharding.shard_shape(qkv.shape) == ((layers, embed // 8, width) if name == "fsdp" else
                                                   (layers, embed, width // 2))  # laid out by the table
    reference = tmp_path / "ref.png"
    _reference_images()[0].save(reference)
    call = dict(prompt=PROMPTS[0], height=32, width=48, num_steps=2, seed=3, image=str(reference),
                max_sequence_length=LENGTH)
    assert sharded_error(klein.pipe, pipe, f"klein {'distilled' if klein.distilled else 'base'} reference",
                         **call) <= SHARDED_TOL
    if klein.distilled:  # the command loads the same way (and runs the executables compiled above)
        out = tmp_path / "x.png"
        assert cli.main(["generate", PROMPTS[0], "--model", str(klein.root), "--out", str(out), "--sharding", name,
                         "--reference", str(reference), "--steps", "2", "--height", "32", "--width", "48", "--seed",
                         "3", "--max-sequence-length", str(LENGTH), "--dtype", "float32", "--attention", "xla"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out)), to_uint8(pipe(**call, output="np"))[0])


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # the start is the same with CFG
def test_img2img_is_the_cut_schedule(klein):
    """img2img (image= with strength=): at strength 1 exactly the text-to-image pixels; at 0.5 those
    of a loop written here: the image's tokens noised to the first sigma of the schedule cut at
    step int(4 - 4 * 0.5) = 2, Euler steps of the transformer from there, decoded."""
    from fluxjax.models import latents2
    from fluxjax.pipeline.flux2 import decode_tokens, encode_tokens, position_ids, text_ids

    pipe = klein.pipe
    image = np.random.default_rng(7).integers(0, 256, (32, 48, 3), np.uint8)
    noise = _latents(2, 32, 48).numpy()
    # test_text_to_image_matches_diffusers' call (its executable reused): 4 steps, 2 prompts
    kw = dict(num_steps=4, latents=noise, max_sequence_length=LENGTH, output="np")
    t2i = pipe(PROMPTS, 32, 48, **kw)
    np.testing.assert_array_equal(pipe(PROMPTS, image=image, strength=1.0, **kw), t2i)
    got = pipe(PROMPTS, image=image, strength=0.5, **kw)

    sigmas, first = pipe.schedule.sigmas(4, 2 * 3), 2
    x0 = encode_tokens(pipe.vae.model, pipe.vae.params, np.broadcast_to(image / 127.5 - 1.0, (2, 32, 48, 3)))
    x = sigmas[first] * latents2.pack(noise) + (1.0 - sigmas[first]) * x0
    txt = pipe.encode(PROMPTS, LENGTH)
    velocity = jax.jit(lambda x, t: pipe.transformer.model.apply(
        {"params": pipe.transformer.params}, x, position_ids(2, 2, 3), txt, text_ids(2, LENGTH), t, None, None))
    for i in range(first, 4):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, np.full((2,), sigmas[i], np.float32))
    want = np.asarray(decode_tokens(pipe.vae.model, pipe.vae.params, x, 2, 3))
    err = float(np.abs(got - want).max())
    print(f"img2img strength 0.5 against the loop written here: max |pixel error| {err:.1e}; "
          f"against text to image {np.abs(got - t2i).max():.2f}")
    assert err <= 1e-5  # the same float32 operations in other programs (measured 1.6e-6)
    assert np.abs(got - t2i).max() > 10 * PIXEL_TOL  # the image does change the result
    with pytest.raises(UsageError, match="img2img: give one image="):
        pipe(PROMPTS[0], 32, 48, strength=0.5, **kw)
    with pytest.raises(UsageError, match="img2img keeps the image's size"):
        pipe(PROMPTS[0], 48, 48, image=image, strength=0.5, output="np")


@pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # FlowEdit refuses a base klein (true CFG)
def test_flowedit_is_the_papers_loop(klein):
    """FlowEdit (flux2_edit, defaults T 4, n_max 3, n_min 0, n_avg 1): with the source prompt as
    the target, exactly the decoded source tokens (every dV is 0); with another target, what
    Algorithm 1 written here gives with the loop's own draws (flowedit.noise)."""
    from fluxjax.pipeline.flux2 import decode_tokens, encode_tokens, position_ids, text_ids
    from fluxjax.sampling import flowedit

    pipe = klein.pipe
    image = np.random.default_rng(8).integers(0, 256, (32, 48, 3), np.uint8)
    kw = dict(seed=5, max_sequence_length=LENGTH, output="np")
    x0 = encode_tokens(pipe.vae.model, pipe.vae.params, image[None].astype(np.float32) / 127.5 - 1.0)
    same = pipe.edit(image, PROMPTS[0], PROMPTS[0], **kw)
    np.testing.assert_array_equal(same, np.asarray(decode_tokens(pipe.vae.model, pipe.vae.params, x0, 2, 3)))
    got = pipe.edit(image, PROMPTS[0], PROMPTS[1], **kw)

    sigmas = pipe.schedule.sigmas(4, 2 * 3)
    src, tar = pipe.encode([PROMPTS[0]], LENGTH), pipe.encode([PROMPTS[1]], LENGTH)
    velocity = jax.jit(lambda x, txt, t: pipe.transformer.model.apply(
        {"params": pipe.transformer.params}, x, position_ids(1, 2, 3), txt, text_ids(1, LENGTH), t, None, None))
    z = x0
    for i in range(4 - 3, 4):  # n_max 3: the first step skipped
        t = np.full((1,), sigmas[i], np.float32)
        z_src = (1.0 - sigmas[i]) * x0 + sigmas[i] * flowedit.noise([5], i, 1, 6, 128)[:, 0]
        z_tar = z + z_src - x0
        z = z + (sigmas[i + 1] - sigmas[i]) * (velocity(z_tar, tar, t) - velocity(z_src, src, t))
    want = np.asarray(decode_tokens(pipe.vae.model, pipe.vae.params, z, 2, 3))
    err = float(np.abs(got - want).max())
    print(f"FlowEdit against Algorithm 1 written here: max |pixel error| {err:.1e}; the edit moved pixels by "
          f"{np.abs(got - same).max():.2f}")
    assert err <= 1e-5  # float32, the same operations in other programs (measured 1.8e-6)
    assert np.abs(got - same).max() > 10 * PIXEL_TOL  # the target prompt does change the image
    base = Flux2Pipeline(pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.schedule, False, "base")
    with pytest.raises(UsageError, match="base klein .* FlowEdit runs on a distilled klein or FLUX.2"):
        base.edit(image, PROMPTS[0], PROMPTS[1], **kw)
    with pytest.raises(UsageError, match="source_guidance: the model \\(klein\\) has no guidance embedding"):
        pipe.edit(image, PROMPTS[0], PROMPTS[1], source_guidance=2.0, **kw)


def test_schedule_matches_diffusers():
    schedule = sampling.Flux2Schedule.from_config(SCHEDULER)
    for steps, seq_len in ((4, 6), (50, 4096), (28, 5000)):
        ref = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
        np.testing.assert_allclose(schedule.sigmas(steps, seq_len), ref.sigmas.numpy(), rtol=0, atol=1e-6)


def test_refusals(klein, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(UsageError, match=r"not a Flux2Pipeline folder, missing transformer/, text_encoder/"):
        FluxPipeline.from_pretrained(tmp_path)  # FLUX.2 [dev]'s class name comes to Flux2Pipeline too
    with pytest.raises(UsageError, match="latents must have shape"):
        klein.pipe("x", latents=np.zeros((1, 16, 2, 2), np.float32))
    with pytest.raises(UsageError, match="not a multiple of 16"):
        klein.pipe("x", 40, 32)
    with pytest.raises(UsageError, match="not supported"):
        Flux2Pipeline.from_pretrained(klein.root, quantize="int8")
