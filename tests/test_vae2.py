"""The FLUX.2 VAE and its latent path against diffusers' AutoencoderKLFlux2 and Flux2KleinPipeline.

A small AutoencoderKLFlux2 of the FLUX.2 structure (4 levels, widths change at the same levels,
32 latent channels, quant convs, mid-block attention, the latent batch norm) gets random weights
and random running statistics, is saved with save_pretrained and loaded by fluxjax. Encode (the
mean the pipeline takes, `sample_mode="argmax"`) and decode must match diffusers at two image
sizes, and the tokens path must match the pipeline's own helpers (`_encode_vae_image`,
`_pack_latents`, `_unpack_latents_with_ids`, `_unpatchify_latents`) and the lines of
`Flux2KleinPipeline.__call__` that denormalise before `vae.decode`.
"""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

from conftest import rel_err
from fluxjax.sampling import sampler as sampling
from fluxjax.config import AutoEncoderConfig, ConfigError
from fluxjax.errors import CheckpointError
from fluxjax.loading.registry import load_vae
from fluxjax.loading.table import table_keys
from fluxjax.loading.vae import diffusers_vae_rules
from fluxjax.models import latents2
from fluxjax.models.autoencoder import AutoEncoder, param_shapes
from fluxjax.testing.reference import randomize_

# FLUX.2 structure at 1/16 of the width: widths 8, 16, 32, 32 (conv_shortcut where FLUX.2 has them).
SMALL = dict(
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=32,
    sample_size=64,
    batch_norm_eps=1e-4,
)
SIZES = [(48, 32), (32, 64)]  # (H, W): not square, both ways round, so a swapped H/W shows up
BATCH = 2
TOL = 1e-5  # fp32 (the VAE acceptance)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().permute(0, 2, 3, 1).numpy()


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The small diffusers VAE with random weights and running statistics, saved with save_pretrained."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**SMALL).eval()
    randomize_(vae, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".to_q." in name or ".to_k." in name:
                p.mul_(3.0)  # logits far from 0, so a wrong attention scale or layout shows up
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(torch.exp(torch.randn(vae.bn.running_var.shape, generator=g)))
    folder = tmp_path_factory.mktemp("vae2") / "vae"
    vae.save_pretrained(folder)
    return dict(vae=vae, folder=str(folder))


@pytest.fixture(scope="module")
def loaded(ref):
    return load_vae(ref["folder"])


@pytest.fixture(scope="module")
def fns(loaded):
    """Jitted encode (mean), decode, to_tokens and from_tokens of the loaded model."""
    model, params = loaded
    eps = model.config.batch_norm_eps
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    to_tokens = jax.jit(lambda bn, z: latents2.to_tokens(z, bn, eps))
    from_tokens = jax.jit(lambda bn, t, rows, cols: latents2.from_tokens(t, bn, eps, rows, cols), static_argnums=(2, 3))
    return types.SimpleNamespace(params=params, enc=enc, dec=dec, to_tokens=to_tokens, from_tokens=from_tokens)


def image(h, w, seed=2) -> torch.Tensor:
    return torch.rand((BATCH, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_from_folder(ref, loaded):
    assert loaded[0].config == AutoEncoderConfig(
        ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=32, norm_num_groups=4, scale_factor=1.0,
        shift_factor=0.0, quant_conv=True, batch_norm_eps=1e-4)


@pytest.mark.parametrize("h,w", SIZES)
def test_encode_and_decode_match_diffusers(ref, fns, h, w):
    vae = ref["vae"]
    x = image(h, w)
    z = torch.randn((BATCH, 32, h // 8, w // 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        pixels = vae.decode(z).sample
    ours = fns.enc(fns.params, jnp.asarray(nhwc(x)))
    assert ours.shape == (BATCH, h // 8, w // 8, 32) and ours.dtype == jnp.float32
    enc_err = rel_err(ours, nhwc(mean))
    out = fns.dec(fns.params, jnp.asarray(nhwc(z)))
    assert out.shape == (BATCH, h, w, 3) and out.dtype == jnp.float32
    dec_err = rel_err(out, nhwc(pixels))
    print(f"{h}x{w}: encode mean rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err <= TOL and dec_err <= TOL


def _pipeline_tokens(vae, x):
    """Flux2KleinPipeline's reference-image path: `_encode_vae_image` (mode, patchify, bn) then `_pack_latents`."""
    pipe = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        return Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._encode_vae_image(pipe, x, generator=None))


def _pipeline_pixels(vae, tokens, rows, cols):
    """Flux2KleinPipeline.__call__ after the loop: unpack by ids, denormalise (its own lines,
    written out as it has them inline), unpatchify, decode."""
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, rows, cols))
    with torch.no_grad():
        latents = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, rows, cols)
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype)
        latents = latents * bn_std + bn_mean
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        return vae.decode(latents, return_dict=False)[0]


@pytest.mark.parametrize("h,w", SIZES)
def test_latent_path_matches_pipeline(ref, fns, h, w):
    """encode -> patchify -> bn -> pack equals the pipeline's tokens; tokens -> unpack -> inverse bn
    -> unpatchify -> decode equals its pixels, from the encoded tokens and from sampler-like noise."""
    vae = ref["vae"]
    rows, cols = h // 16, w // 16
    x = image(h, w)
    tokens_ref = _pipeline_tokens(vae, x)
    bn = fns.params["bn"]
    tokens = fns.to_tokens(bn, fns.enc(fns.params, jnp.asarray(nhwc(x))))
    assert tokens.shape == (BATCH, rows * cols, 128) and tokens.dtype == jnp.float32
    tok_err = rel_err(tokens, tokens_ref.numpy())

    noise = torch.randn((BATCH, rows * cols, 128), generator=torch.Generator().manual_seed(4))
    errs = []
    for t in (tokens_ref, noise):
        pixels_ref = _pipeline_pixels(vae, t, rows, cols)
        ours = fns.dec(fns.params, fns.from_tokens(bn, jnp.asarray(t.numpy()), rows, cols))
        errs.append(rel_err(ours, nhwc(pixels_ref)))
    print(f"{h}x{w}: tokens rel err {tok_err:.2e}, pixels rel err from encoded {errs[0]:.2e}, from noise {errs[1]:.2e}")
    assert tok_err <= TOL and max(errs) <= TOL


def test_bf16_decode_error_within_reference_bf16_error(ref):
    """In bfloat16 (parameters, statistics and compute), fluxjax's decode of tokens is no further
    from the fp32 reference than diffusers' own bf16 pipeline path is (the FLUX.1 test's bound)."""
    model, params = load_vae(ref["folder"], dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    h, w = SIZES[0]
    rows, cols = h // 16, w // 16
    tokens = torch.randn((BATCH, rows * cols, 128), generator=torch.Generator().manual_seed(6))
    expected = nhwc(_pipeline_pixels(ref["vae"], tokens, rows, cols))
    z = latents2.from_tokens(jnp.asarray(tokens.numpy()), params["bn"], model.config.batch_norm_eps, rows, cols)
    ours = rel_err(jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z), expected)
    vae16 = copy.deepcopy(ref["vae"]).to(torch.bfloat16)
    theirs = rel_err(nhwc(_pipeline_pixels(vae16, tokens.to(torch.bfloat16), rows, cols)), expected)
    print(f"decode bf16 rel err: fluxjax {ours:.2e}, diffusers {theirs:.2e}")
    assert ours <= 1.5 * theirs


def test_latent_functions_are_diffusers_helpers():
    """Each function alone equals the pipeline helper it stands for, exactly (pure data movement),
    and FLUX.1's sampling.pack is pack(patchify(.)) (the same feature order)."""
    z = torch.randn((BATCH, 32, 6, 4), generator=torch.Generator().manual_seed(5))
    zj = jnp.asarray(z.numpy())
    patched = latents2.patchify(zj)
    np.testing.assert_array_equal(patched, Flux2KleinPipeline._patchify_latents(z).numpy())
    np.testing.assert_array_equal(latents2.unpatchify(patched), z.numpy())
    packed = latents2.pack(patched)
    np.testing.assert_array_equal(packed, Flux2KleinPipeline._pack_latents(torch.from_numpy(np.array(patched))).numpy())
    np.testing.assert_array_equal(latents2.unpack(packed, 3, 2), patched)
    np.testing.assert_array_equal(packed, sampling.pack(zj))


def test_normalize_is_inverted_by_denormalize(loaded):
    _, params = loaded
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 128, 2, 3))
    y = latents2.normalize(x, params["bn"], 1e-4)
    assert rel_err(y, x) > 0.1  # the statistics really apply
    assert rel_err(latents2.denormalize(y, params["bn"], 1e-4), x) <= 1e-6


# --- strictness ---------------------------------------------------------------------------


def _write_modified(ref, tmp_path, change):
    """A copy of the saved folder with its safetensors changed by `change(dict)`."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(open(f"{ref['folder']}/config.json").read())
    tensors = np_load_file(f"{ref['folder']}/diffusion_pytorch_model.safetensors")
    change(tensors)
    path = folder / "diffusion_pytorch_model.safetensors"
    np_save_file(tensors, str(path))
    return str(folder)


@pytest.mark.parametrize("key", ["bn.running_var", "quant_conv.weight", "post_quant_conv.bias"])
def test_missing_key_raises(ref, tmp_path, key):
    folder = _write_modified(ref, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_vae(folder)
    msg = str(e.value)
    assert folder in msg and key in msg and "missing" in msg and "\n" not in msg


def test_wrong_shape_raises(ref, tmp_path):
    key = "bn.running_mean"
    folder = _write_modified(ref, tmp_path, lambda t: t.__setitem__(key, np.zeros((32,), np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_vae(folder)
    msg = str(e.value)
    assert folder in msg and key in msg and "[128]" in msg and "\n" not in msg


def test_flux1_vae_rejects_a_batch_norm_key(tmp_path):
    """num_batches_tracked is left unused in a FLUX.2 VAE only; a FLUX.1 table still refuses it."""
    cfg = AutoEncoderConfig.preset("tiny")
    assert "bn.num_batches_tracked" not in table_keys(diffusers_vae_rules(cfg))
    path = tmp_path / "vae.safetensors"
    np_save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": np.zeros((1,), np.float32),
                  "bn.num_batches_tracked": np.zeros((), np.int64)}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_vae(str(path), config=cfg)
    assert "bn.num_batches_tracked" in str(e.value)


@pytest.mark.parametrize("change,word", [
    (dict(decoder_block_out_channels=[8, 16, 16, 32]), "decoder_block_out_channels"),
    (dict(use_post_quant_conv=False), "use_post_quant_conv"),
    (dict(patch_size=[1, 1]), "patch_size"),
])
def test_unsupported_config_raises(change, word):
    cfg = dict(SMALL, block_out_channels=list(SMALL["block_out_channels"]), _class_name="AutoencoderKLFlux2", **change)
    with pytest.raises(ConfigError, match=word):
        AutoEncoderConfig.from_hf_config(cfg)


# --- full size ----------------------------------------------------------------------------


def test_full_size_matches_diffusers_default():
    """The "flux2" preset is diffusers' AutoencoderKLFlux2() (its defaults are FLUX.2's VAE): same
    config, parameter count and keys (num_batches_tracked aside), without weights."""
    with torch.device("meta"):
        vae = AutoencoderKLFlux2()
    cfg = AutoEncoderConfig.preset("flux2")
    assert AutoEncoderConfig.from_hf_config(dict(vae.config, _class_name="AutoencoderKLFlux2")) == cfg
    flat = traverse_util.flatten_dict(meta.unbox(param_shapes(AutoEncoder(cfg))), sep="/")
    state = {k: v for k, v in vae.state_dict().items() if k != "bn.num_batches_tracked"}
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == sum(v.numel() for v in state.values())
    assert sorted(table_keys(diffusers_vae_rules(cfg))) == sorted(state)
