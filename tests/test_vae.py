"""The FLUX VAE against diffusers' AutoencoderKL, through both checkpoint layouts.

A small AutoencoderKL of the FLUX structure (4 levels, widths change at the same levels, 16
latent channels, no quant convs, mid-block attention) gets random weights (norms included),
is saved with save_pretrained and, re-keyed here independently of fluxjax/loading/vae.py, as a
BFL-layout ae.safetensors; fluxjax loads both and must reproduce diffusers' encode (mean and
sample) and decode. Full size is checked without weights.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

import diffusers.models.autoencoders.vae as diffusers_vae_module
from diffusers import AutoencoderKL

from fluxjax.loading.safetensors_io import CheckpointError
from fluxjax.loading.table import TRANSFORMS, table_keys
from fluxjax.loading.registry import load_vae
from fluxjax.loading.vae import bfl_vae_rules, diffusers_vae_rules
from fluxjax.config import AutoEncoderConfig
from fluxjax.models.autoencoder import CONV_AXES, AutoEncoder, param_shapes

SCALE, SHIFT = 0.3611, 0.1159
# FLUX structure at 1/8 of the width: widths 16, 32, 64, 64 (nin_shortcut where FLUX has them).
SMALL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
FLUX_DIFFUSERS = dict(SMALL, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024)
H, W = 48, 32  # not square, so a swapped H/W shows up
BATCH = 2


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().permute(0, 2, 3, 1).numpy()


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomise(vae: AutoencoderKL, seed: int = 0) -> None:
    """Random weights everywhere: default conv/linear init, random norm affines, and attention
    q/k large enough that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:  # norm1, norm2, group_norm, conv_norm_out
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif re.search(r"\.to_[qk]\.weight$", name):
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def bfl_state_dict(sd: dict, levels: int) -> dict:
    """A diffusers AutoencoderKL state dict re-keyed to BFL's ae.safetensors layout.

    Written from docs/model-reference.md ("Checkpoint keys") with regular expressions, independently of
    fluxjax/loading/vae.py.
    """
    out = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.", k)
        k = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", k)
        k = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm.", k)
        attn = re.match(r"^(\w+)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if attn:
            new = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attn[2]]
            k = f"{attn[1]}.mid.attn_1.{new}.{attn[3]}"
            if attn[3] == "weight":
                value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        assert k not in out, k
        out[k] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The small diffusers VAE, saved both ways, with reference inputs and outputs."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**SMALL).eval()
    randomise(vae)
    root = tmp_path_factory.mktemp("vae")
    folder = root / "vae"
    vae.save_pretrained(folder)
    ae_path = root / "ae.safetensors"
    torch_save_file(bfl_state_dict(vae.state_dict(), 4), str(ae_path))

    g = torch.Generator().manual_seed(1)
    x = torch.rand((BATCH, 3, H, W), generator=g) * 2 - 1
    z = torch.randn((BATCH, 16, H // 8, W // 8), generator=g)  # normalised latents
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mean = (dist.mode() - SHIFT) * SCALE
        pixels = vae.decode(z / SCALE + SHIFT).sample
    return dict(vae=vae, folder=str(folder), ae=str(ae_path), x=x, z=z, mean=nhwc(mean), pixels=nhwc(pixels),
                cfg=AutoEncoderConfig.from_hf_config(str(folder)))


@pytest.fixture(scope="module")
def fns():
    """Jitted (encode, decode) per model; params are arguments, so one compile serves any params.

    encode(p, x, key) -> (mean latents, sampled latents): one program for both modes (the
    encoder is shared), which halves the compile time on the test's CPU.
    """
    cache = {}

    def get(model: AutoEncoder):
        if model not in cache:
            def enc(p, x, key):
                return (model.apply({"params": p}, x, method="encode"),
                        model.apply({"params": p}, x, key, method="encode"))

            dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
            cache[model] = (jax.jit(enc), dec)
        return cache[model]

    return get


@pytest.fixture(scope="module")
def folder_model(ref):
    return load_vae(ref["folder"])


def test_config_from_folder(ref):
    assert ref["cfg"] == AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
                                           norm_num_groups=8, scale_factor=SCALE, shift_factor=SHIFT)


def test_encode_mean_matches_diffusers(ref, folder_model, fns):
    model, params = folder_model
    enc, _ = fns(model)
    out, _ = enc(params, jnp.asarray(nhwc(ref["x"])), jax.random.PRNGKey(0))
    assert out.shape == (BATCH, H // 8, W // 8, 16) and out.dtype == jnp.float32
    err = rel_err(out, ref["mean"])
    print(f"encode mean fp32 rel err {err:.2e}")
    assert err <= 1e-5


def test_decode_matches_diffusers(ref, folder_model, fns):
    model, params = folder_model
    _, dec = fns(model)
    out = dec(params, jnp.asarray(nhwc(ref["z"])))
    assert out.shape == (BATCH, H, W, 3) and out.dtype == jnp.float32
    err = rel_err(out, ref["pixels"])
    print(f"decode fp32 rel err {err:.2e}")
    assert err <= 1e-5


def _diffusers_sample(vae, x, eps_nhwc, monkeypatch):
    """diffusers' latent_dist.sample() with its N(0,1) draw replaced by `eps_nhwc`, normalised."""
    eps = torch.from_numpy(np.array(eps_nhwc)).permute(0, 3, 1, 2).contiguous()

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        assert tuple(shape) == tuple(eps.shape)
        return eps.to(dtype)

    monkeypatch.setattr(diffusers_vae_module, "randn_tensor", fake_randn)
    with torch.no_grad():
        return nhwc((vae.encode(x).latent_dist.sample() - SHIFT) * SCALE)


def test_encode_sample_matches_diffusers(ref, folder_model, fns, monkeypatch):
    model, params = folder_model
    enc, _ = fns(model)
    key = jax.random.PRNGKey(7)
    eps = jax.random.normal(key, (BATCH, H // 8, W // 8, 16), jnp.float32)  # the documented draw
    expected = _diffusers_sample(ref["vae"], ref["x"], eps, monkeypatch)
    _, out = enc(params, jnp.asarray(nhwc(ref["x"])), key)
    err = rel_err(out, expected)
    print(f"encode sample fp32 rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(out, ref["mean"]) > 1e-3  # really sampled


def test_encode_sample_clamps_logvar(ref, folder_model, fns, monkeypatch):
    """logvar beyond [-30, 20] is clamped as diffusers does (the std would be e^20 times larger)."""
    model, params = folder_model
    vae = copy.deepcopy(ref["vae"])
    with torch.no_grad():
        vae.encoder.conv_out.bias[16] += 200.0  # logvar channel 0 far above 20
        vae.encoder.conv_out.bias[17] -= 200.0  # logvar channel 1 far below -30
    params = jax.tree_util.tree_map(lambda a: a, params)
    bias = np.array(params["encoder"]["conv_out"]["bias"])
    bias[16] += 200.0
    bias[17] -= 200.0
    params["encoder"]["conv_out"]["bias"] = jnp.asarray(bias)
    enc, _ = fns(model)
    key = jax.random.PRNGKey(3)
    eps = jax.random.normal(key, (BATCH, H // 8, W // 8, 16), jnp.float32)
    expected = _diffusers_sample(vae, ref["x"], eps, monkeypatch)
    out = np.asarray(enc(params, jnp.asarray(nhwc(ref["x"])), key)[1])
    assert np.abs(expected[..., 0]).max() > 1e3  # std e^10 after the clamp
    assert rel_err(out[..., 0], expected[..., 0]) <= 1e-5
    assert rel_err(out[..., 1:], expected[..., 1:]) <= 1e-5


def test_bfl_file_loads_the_same(ref, folder_model, fns):
    model, params = load_vae(ref["ae"], config=ref["cfg"])
    assert model == folder_model[0]
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, folder_model[1])
    assert all(jax.tree_util.tree_leaves(same))
    enc, dec = fns(model)
    assert rel_err(enc(params, jnp.asarray(nhwc(ref["x"])), jax.random.PRNGKey(0))[0], ref["mean"]) <= 1e-5
    assert rel_err(dec(params, jnp.asarray(nhwc(ref["z"]))), ref["pixels"]) <= 1e-5


def test_bfl_file_confirmed_by_diffusers_single_file(ref):
    """diffusers' own single-file loader reads the test's BFL file back into the original model."""
    loaded = AutoencoderKL.from_single_file(ref["ae"], config=ref["folder"], local_files_only=True).eval()
    original = ref["vae"].state_dict()
    state = loaded.state_dict()
    assert sorted(state) == sorted(original)
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        pixels = loaded.decode(ref["z"] / SCALE + SHIFT).sample
    np.testing.assert_array_equal(nhwc(pixels), ref["pixels"])


def test_bf16_decode_error_within_reference_bf16_error(ref, fns):
    model, params = load_vae(ref["folder"], dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    _, dec = fns(model)
    ours = rel_err(dec(params, jnp.asarray(nhwc(ref["z"])).astype(jnp.bfloat16)), ref["pixels"])
    vae16 = copy.deepcopy(ref["vae"]).to(torch.bfloat16)
    with torch.no_grad():
        theirs_out = vae16.decode((ref["z"].to(torch.bfloat16) / SCALE + SHIFT).to(torch.bfloat16)).sample
    theirs = rel_err(nhwc(theirs_out), ref["pixels"])
    print(f"decode bf16 rel err: fluxjax {ours:.2e}, diffusers {theirs:.2e}")
    assert ours <= 1.5 * theirs


# --- strictness ---------------------------------------------------------------------------


def _write_modified(ref, tmp_path, change):
    tensors = np_load_file(ref["ae"])
    change(tensors)
    path = tmp_path / "ae_bad.safetensors"
    np_save_file(tensors, str(path))
    return str(path)


def test_missing_key_raises(ref, tmp_path):
    key = "decoder.up.1.upsample.conv.weight"
    path = _write_modified(ref, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_vae(path, config=ref["cfg"])
    assert path in str(e.value) and key in str(e.value) and "missing" in str(e.value)


def test_extra_key_raises(ref, tmp_path):
    key = "encoder.mid.attn_1.extra.weight"
    path = _write_modified(ref, tmp_path, lambda t: t.__setitem__(key, np.zeros((2,), np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_vae(path, config=ref["cfg"])
    assert path in str(e.value) and key in str(e.value)


def test_wrong_shape_raises(ref, tmp_path):
    key = "encoder.mid.attn_1.q.weight"
    path = _write_modified(ref, tmp_path, lambda t: t.__setitem__(key, np.zeros((64, 64), np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_vae(path, config=ref["cfg"])
    msg = str(e.value)
    assert path in msg and key in msg and "[64, 64, 1, 1]" in msg


def test_diffusers_folder_strict(ref, tmp_path):
    """The diffusers table is strict too: a config with other widths fails, naming the folder and key."""
    wrong = ref["cfg"].replace(ch_mult=(1, 2, 2, 4))
    with pytest.raises(CheckpointError) as e:
        load_vae(ref["folder"], config=wrong)
    assert ref["folder"] in str(e.value) and "conv_shortcut" in str(e.value)


# --- structure, logical axes, full size ---------------------------------------------------


def test_logical_axes_on_every_parameter():
    shapes = param_shapes(AutoEncoder(AutoEncoderConfig.preset("tiny")))
    flat = traverse_util.flatten_dict(shapes, sep="/")
    assert flat
    for path, leaf in flat.items():
        assert isinstance(leaf, meta.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        if path.endswith("/kernel") and len(leaf.value.shape) == 4:
            assert leaf.names == CONV_AXES, path
        if "norm" in path.split("/")[-2]:
            assert leaf.names == ("norm",), path


def test_full_size_parameter_count_and_diffusers_keys():
    cfg = AutoEncoderConfig.preset("flux")
    assert AutoEncoderConfig.from_hf_config(FLUX_DIFFUSERS) == cfg
    flat = traverse_util.flatten_dict(meta.unbox(param_shapes(AutoEncoder(cfg))), sep="/")
    ours = sum(int(np.prod(v.shape)) for v in flat.values())
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_DIFFUSERS)
    state = vae.state_dict()
    theirs = sum(v.numel() for v in state.values())
    assert ours == theirs == 83_819_683
    rules = diffusers_vae_rules(cfg)
    assert sorted(table_keys(rules)) == sorted(state)
    for rule in rules:  # each key's PyTorch shape is the one its Flax leaf expects
        (key,) = rule.keys()
        assert tuple(state[key].shape) == tuple(TRANSFORMS[rule.transform][1](flat[rule.target].shape)), key


def test_bfl_table_is_the_reference_key_set():
    """docs/model-reference.md ("Checkpoint keys", "The autoencoder"), written out by hand:
    106 encoder + 138 decoder = 244 tensors."""
    cfg = AutoEncoderConfig.preset("flux")
    mods = ["encoder.conv_in", "encoder.norm_out", "encoder.conv_out",
            "decoder.conv_in", "decoder.norm_out", "decoder.conv_out"]
    res = ("norm1", "conv1", "norm2", "conv2")
    mods += [f"encoder.down.{i}.block.{j}.{m}" for i in range(4) for j in range(2) for m in res]
    mods += [f"encoder.down.{i}.block.0.nin_shortcut" for i in (1, 2)]
    mods += [f"encoder.down.{i}.downsample.conv" for i in range(3)]
    for part in ("encoder", "decoder"):
        mods += [f"{part}.mid.{b}.{m}" for b in ("block_1", "block_2") for m in res]
        mods += [f"{part}.mid.attn_1.{m}" for m in ("norm", "q", "k", "v", "proj_out")]
    mods += [f"decoder.up.{i}.block.{j}.{m}" for i in range(4) for j in range(3) for m in res]
    mods += [f"decoder.up.{i}.block.0.nin_shortcut" for i in (0, 1)]
    mods += [f"decoder.up.{i}.upsample.conv" for i in (1, 2, 3)]
    expected = {f"{m}.{p}" for m in mods for p in ("weight", "bias")}
    keys = table_keys(bfl_vae_rules(cfg))
    assert len(keys) == len(set(keys)) == len(expected) == 244
    assert set(keys) == expected
    assert sum(k.startswith("encoder.") for k in keys) == 106


def test_pipeline_folder_resolves_to_vae(ref, folder_model, tmp_path):
    """A pipeline folder (model_index.json + vae/) loads its vae/ subfolder."""
    (tmp_path / "vae").symlink_to(ref["folder"], target_is_directory=True)
    model, params = load_vae(tmp_path)
    assert model == folder_model[0]
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, folder_model[1])
    assert all(jax.tree_util.tree_leaves(same))
