"""FLUX.2 [dev] generation against diffusers' Flux2Pipeline: pixels of a tiny random hub folder
(Mistral3 text encoder, a transformer with a guidance embedding), two sizes, two prompts, the
embedded guidance, one reference image; FluxPipeline.from_pretrained's dispatch; refused arguments;
the reference call under fsdp on 8 simulated devices against one device.

The folder is what Flux2Pipeline.save_pretrained writes for small random components built with
diffusers' and transformers' own classes (Mistral3ForConditionalGeneration with 30 text layers so
the default hidden states 10, 20, 30 exist) and a Mistral-style tokenizer made locally
(fluxjax.pipeline.mistral_tokenizer.make_tokenizer; the hub's PixtralProcessor needs torchvision,
and gives the same ids for text). Nothing is downloaded.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline
from diffusers import Flux2Transformer2DModel

from fluxjax.errors import UsageError
from fluxjax.pipeline.flux2 import FLUX2_DEV, Flux2Pipeline
from fluxjax.pipeline.mistral_tokenizer import make_tokenizer
from fluxjax.pipeline.pipeline import FluxPipeline
from fluxjax.testing.reference import randomize_
from test_flux2_pipeline import (PIXEL_TOL, PROMPTS, SCHEDULER, SHARDED_TOL, SIZES, VAE, _latents, _reference_images,
                                 sharded, sharded_error)

LENGTH = 128  # text tokens (the system message alone is about 75); the default 512 in one case
TEXT = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, rms_norm_eps=1e-5, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e9}, tie_word_embeddings=False)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
              image_size=32, patch_size=16)
TRANSFORMER = dict(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=3 * TEXT["hidden_size"], mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                   guidance_embeds=True)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """diffusers' Flux2Pipeline and fluxjax's, float32, from one saved folder."""
    root = tmp_path_factory.mktemp("flux2_dev")
    tokenizer = make_tokenizer(root / "tok")
    config = transformers.Mistral3Config(text_config=dict(TEXT, vocab_size=len(tokenizer)), vision_config=VISION,
                                         tie_word_embeddings=False)
    mistral = transformers.Mistral3ForConditionalGeneration(config).eval()
    randomize_(mistral, 0)
    transformer = Flux2Transformer2DModel(**TRANSFORMER).eval()
    randomize_(transformer, 1)
    vae = AutoencoderKLFlux2(**VAE).eval()
    randomize_(vae, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so a missing normalisation shows
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(torch.exp(0.3 * torch.randn(vae.bn.running_var.shape, generator=g)))
    ref = DiffusersFlux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=mistral,
                                 tokenizer=tokenizer, transformer=transformer)
    ref.save_pretrained(root / "hub")
    pipe = FluxPipeline.from_pretrained(root / "hub", dtype="float32", attention_impl="xla")
    return types.SimpleNamespace(ref=ref, pipe=pipe, root=root / "hub")


def _compare(d, prompt, height, width, steps, ours: dict, theirs: dict, length=LENGTH):
    """max |pixel error| of fluxjax against diffusers on the same latents; length None: the
    pipelines' default (512 text tokens)."""
    batch = len(prompt) if isinstance(prompt, list) else 1
    latents = _latents(batch, height, width)
    text = {} if length is None else {"max_sequence_length": length}
    with torch.no_grad():
        want = d.ref(prompt=prompt, height=height, width=width, num_inference_steps=steps, latents=latents,
                     output_type="np", **text, **theirs).images
    got = d.pipe(prompt, height, width, num_steps=steps, latents=latents.numpy(), output="np", **text, **ours)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    print(f"dev {width}x{height} batch {batch} {steps} steps {length or 512} tokens {sorted(ours)}: "
          f"max |pixel error| {err:.2e} (pixels std {want.std():.3f})")
    assert want.std() > 0.02  # a real image, not a flat one
    d.last = got
    return err


def test_dispatch(dev):
    assert isinstance(dev.pipe, Flux2Pipeline) and dev.pipe.family is FLUX2_DEV
    assert json.loads((dev.root / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    d = dev.pipe.defaults
    assert (d.num_steps, d.guidance, d.true_cfg_scale, d.max_sequence_length) == (50, 4.0, None, 512)


@pytest.mark.parametrize("size", SIZES)
def test_text_to_image_matches_diffusers(dev, size):
    height, width = size
    length = LENGTH if size == SIZES[0] else None  # the second size at the default 512 tokens
    # guidance left at both pipelines' default (4)
    assert _compare(dev, PROMPTS, height, width, 3, {}, {}, length=length) < PIXEL_TOL


def test_guidance_matches_diffusers(dev):
    assert _compare(dev, PROMPTS[1], 32, 48, 2, {"guidance": 2.5}, {"guidance_scale": 2.5}) < PIXEL_TOL
    other = dev.pipe(PROMPTS[1], 32, 48, num_steps=2, latents=_latents(1, 32, 48).numpy(), output="np",
                     max_sequence_length=LENGTH, guidance=6.0)
    assert np.abs(other - dev.last).max() > 10 * PIXEL_TOL  # the guidance value does change the image


def test_reference_image_matches_diffusers(dev):
    image = _reference_images()[0]
    assert _compare(dev, PROMPTS[0], 32, 48, 2, {"image": image}, {"image": image}) < PIXEL_TOL


@pytest.mark.slow
def test_sharded_reference_image_gives_the_single_device_image(dev):
    """The previous test's call under fsdp over 8 devices (Mistral and the transformer split 8 ways)."""
    pipe = sharded(dev.root, "fsdp", (8,))
    q = pipe.text_encoder.params["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, embed, heads * head_dim)
    assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 8, q.shape[2])
    call = dict(prompt=PROMPTS[0], height=32, width=48, num_steps=2, latents=_latents(1, 32, 48).numpy(),
                image=_reference_images()[0], max_sequence_length=LENGTH)
    assert sharded_error(dev.pipe, pipe, "dev reference", **call) <= SHARDED_TOL


def test_refusals(dev):
    with pytest.raises(UsageError, match=r"FLUX.2 \[dev\] .*leave true_cfg_scale and negative_prompt unset"):
        dev.pipe("x", 32, 32, num_steps=1, true_cfg_scale=3.0, output="np")
    with pytest.raises(UsageError, match="guidance must be a finite number"):
        dev.pipe("x", 32, 32, num_steps=1, guidance=float("nan"), output="np")
    with pytest.raises(UsageError, match="layers: 31 is not a hidden-state index of this Mistral"):
        dev.pipe("x", 32, 32, num_steps=1, text_encoder_out_layers=(10, 20, 31), output="np")
