"""The FLUX.2 transformer (FluxConfig's FLUX.2 settings) against diffusers' Flux2Transformer2DModel:
tiny random folders with and without the guidance embedding, BFL flux2 single files, strict key
and shape errors, the named configs and the logical axes of every parameter."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from flax import linen as nn
from safetensors.torch import save_file

from conftest import rel_err

from fluxjax.config import FLUX2_SETTINGS, ConfigError, FluxConfig
from fluxjax.loading.registry import load_transformer
from fluxjax.loading.safetensors_io import CheckpointError
from fluxjax.models.axes import PARAMETER_AXES
from fluxjax.models.flux import Flux, param_shapes
from fluxjax.testing.reference import randomize_
from fluxjax.parallel.strategies import Strategy
from fluxjax.plan.counts import transformer_count

# x max|reference| (conftest.rel_err), as tests/test_transformer.py's FLUX.1 bound. Measured: 2.7e-6
# (dev_like) and 1.4e-6 (klein_like), nearly all from the timestep embedding: fluxjax's sinusoid
# frequencies are correctly rounded, torch's float32 exp is an ulp off (test_transformer.py's
# test_timestep_embedding), which moves t*1000 = 800 by ~5e-5 rad. At t = 0 that difference vanishes:
FP32_TOL = 1e-5
# measured 3.9e-7 and 2.4e-7 at t = 0, where diffusers' own float32 run is 4.1e-7 and 2.7e-7 from
# its float64 run: a bound just above the reference's own float32 noise.
FP32_TOL_T0 = 1e-6

CONFIGS = {
    # FLUX.2 [dev]-like: guidance embedding; 2 heads of 32 over 4 unequal RoPE axes
    "dev_like": dict(
        in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=48, mlp_ratio=3.0, axes_dims_rope=(4, 8, 8, 12), guidance_embeds=True,
    ),
    # klein-like: no guidance embedding, 3 heads of 16
    "klein_like": dict(
        in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=24, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ),
}
GRID = (3, 5)  # non-square token grid (rows, cols)
BATCH, L_TXT = 2, 7


def make_inputs(cfg: dict, seed: int = 1) -> dict:
    """diffusers' keyword inputs. Ids as Flux2KleinPipeline lays them out, (t, h, w, l): image
    tokens (10, row, col, 0) (t = 10 as a reference image's), text tokens (0, 0, 0, index)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = GRID
    img_ids = torch.zeros(rows, cols, 4)
    img_ids[..., 0] = 10
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None]
    txt_ids = torch.zeros(L_TXT, 4)
    txt_ids[:, 3] = torch.arange(L_TXT)
    return dict(
        hidden_states=torch.randn(BATCH, rows * cols, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(BATCH, L_TXT, cfg["joint_attention_dim"], generator=gen),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=img_ids.reshape(-1, 4),
        txt_ids=txt_ids,
        guidance=torch.tensor([3.5, 2.0]) if cfg["guidance_embeds"] else None,
    )


def flux_args(inputs: dict) -> tuple:
    """diffusers keyword inputs -> fluxjax's positional arguments (ids get the batch axis; no y)."""
    j = lambda t: jnp.asarray(t.float().numpy())  # noqa: E731
    batch = lambda ids: jnp.broadcast_to(j(ids), (BATCH,) + tuple(ids.shape))  # noqa: E731
    g = inputs["guidance"]
    return (j(inputs["hidden_states"]), batch(inputs["img_ids"]), j(inputs["encoder_hidden_states"]),
            batch(inputs["txt_ids"]), j(inputs["timestep"]), None, None if g is None else j(g))


def to_bfl(sd: dict, num_layers: int, num_single: int) -> dict:
    """diffusers Flux2Transformer2DModel state dict -> BFL flux2 keys (diffusers'
    scripts/convert_flux2_to_diffusers.py, reversed)."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    cp = lambda dst, src: out.__setitem__(f"{dst}.weight", take(f"{src}.weight"))  # noqa: E731
    cp("img_in", "x_embedder")
    cp("txt_in", "context_embedder")
    for ours, theirs in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        if f"time_guidance_embed.{theirs}.linear_1.weight" in sd:
            cp(f"{ours}.in_layer", f"time_guidance_embed.{theirs}.linear_1")
            cp(f"{ours}.out_layer", f"time_guidance_embed.{theirs}.linear_2")
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        cp(f"{m}.lin", f"{m}.linear")
    cp("final_layer.linear", "proj_out")
    scale, shift = take("norm_out.linear.weight").chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for i in range(num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        out[f"{b}.img_attn.qkv.weight"] = torch.cat([take(f"{t}.attn.to_{x}.weight") for x in "qkv"])
        out[f"{b}.txt_attn.qkv.weight"] = torch.cat([take(f"{t}.attn.add_{x}_proj.weight") for x in "qkv"])
        cp(f"{b}.img_attn.proj", f"{t}.attn.to_out.0")
        cp(f"{b}.txt_attn.proj", f"{t}.attn.to_add_out")
        cp(f"{b}.img_mlp.0", f"{t}.ff.linear_in")
        cp(f"{b}.img_mlp.2", f"{t}.ff.linear_out")
        cp(f"{b}.txt_mlp.0", f"{t}.ff_context.linear_in")
        cp(f"{b}.txt_mlp.2", f"{t}.ff_context.linear_out")
        for ours, theirs in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                             ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{b}.{ours}.scale"] = take(f"{t}.attn.{theirs}.weight")
    for j in range(num_single):
        b, t = f"single_blocks.{j}", f"single_transformer_blocks.{j}"
        cp(f"{b}.linear1", f"{t}.attn.to_qkv_mlp_proj")
        cp(f"{b}.linear2", f"{t}.attn.to_out")
        out[f"{b}.norm.query_norm.scale"] = take(f"{t}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = take(f"{t}.attn.norm_k.weight")
    assert used == set(sd), sorted(set(sd) - used)  # every diffusers tensor went into a BFL key
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ref(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    model = Flux2Transformer2DModel(**cfg).eval()
    randomize_(model, seed=list(CONFIGS).index(name))
    folder = tmp_path_factory.mktemp(name) / "transformer"
    model.save_pretrained(folder)
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs).sample.numpy()
    bfl = to_bfl(model.state_dict(), cfg["num_layers"], cfg["num_single_layers"])
    bfl_file = folder.parent / "flux2-test.safetensors"
    save_file(bfl, str(bfl_file))
    return types.SimpleNamespace(name=name, cfg=cfg, model=model, folder=folder, bfl=bfl, bfl_file=bfl_file,
                                 inputs=inputs, out=out)


def test_diffusers_folder_matches_reference(ref):
    model, params = load_transformer(ref.folder)
    c = model.config
    assert (c.shared_modulation, c.mlp, c.bias, c.qkv_bias, c.vec_in_dim, c.theta) == (True, "swiglu", False, False, 0, 2000)
    assert c.axes_dim == tuple(ref.cfg["axes_dims_rope"]) and c.guidance_embed == ref.cfg["guidance_embeds"]
    out = jax.jit(model.apply)({"params": params}, *flux_args(ref.inputs))
    assert out.shape == ref.out.shape == (BATCH, GRID[0] * GRID[1], 128)
    err = rel_err(out, ref.out)
    print(f"{ref.name}: max |fluxjax - diffusers| / max |diffusers| = {err:.2e}")
    assert err <= FP32_TOL


def test_at_time_zero_within_the_references_own_float32_noise(ref):
    inputs = dict(ref.inputs, timestep=torch.zeros(BATCH))
    if inputs["guidance"] is not None:
        inputs["guidance"] = torch.zeros(BATCH)
    with torch.no_grad():
        theirs = ref.model(**inputs).sample.numpy()
    model, params = load_transformer(ref.folder)
    err = rel_err(jax.jit(model.apply)({"params": params}, *flux_args(inputs)), theirs)
    print(f"{ref.name}, t = 0: {err:.2e}")
    assert err <= FP32_TOL_T0


def test_bfl_flux2_file_gives_the_same_model(ref):
    _, from_folder = load_transformer(ref.folder)
    # The file's shapes give everything but axes_dim, which is FLUX.2's (32,)*4 only at head dim 128.
    model, from_bfl = load_transformer(ref.bfl_file, config=FluxConfig.from_hf_config(ref.folder))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bfl, from_folder)
    with pytest.raises(CheckpointError, match=r"head dim \d+ is not FLUX's 128"):
        load_transformer(ref.bfl_file)


def test_bfl_flux2_config_is_inferred_from_shapes(tmp_path):
    """At head dim 128 a flux2 file's config comes from its shapes alone (2 heads, tiny otherwise)."""
    cfg = dict(CONFIGS["klein_like"], attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(32, 32, 32, 32),
               num_layers=1, num_single_layers=1, guidance_embeds=True)
    model = Flux2Transformer2DModel(**cfg)
    path = tmp_path / "flux-2-small.safetensors"
    save_file(to_bfl(model.state_dict(), 1, 1), str(path))
    flux, _ = load_transformer(path)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    assert flux.config == FluxConfig.from_hf_config(folder)


@pytest.mark.parametrize("ref", ["klein_like"], indirect=True)
def test_orbax_conversion_restores_the_same_model(ref, tmp_path):
    from fluxjax.commands.cli import main

    dst = tmp_path / "klein-orbax"
    assert main(["convert", str(ref.folder), str(dst), "--dtype", "float32"]) == 0
    model_st, direct = load_transformer(ref.folder)
    model_ob, restored = load_transformer(dst)
    assert model_ob.config == model_st.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, direct)


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_transformer(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ref", ["dev_like"], indirect=True)
def test_missing_misshapen_and_extra_keys_are_named_in_one_line(ref, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(str(ref.folder / "diffusion_pytorch_model.safetensors"))
    config = (ref.folder / "config.json").read_text()
    for case, change in {
        "missing": lambda w: w.pop("single_transformer_blocks.1.attn.to_qkv_mlp_proj.weight"),
        "shape": lambda w: w.__setitem__("double_stream_modulation_txt.linear.weight",
                                         w["double_stream_modulation_txt.linear.weight"][:-1].contiguous()),
        "extra": lambda w: w.__setitem__("time_text_embed.text_embedder.linear_1.weight", torch.zeros(2, 2)),
    }.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text(config)
        broken = dict(weights)
        change(broken)
        save_file(broken, str(folder / "diffusion_pytorch_model.safetensors"))
        match = {
            "missing": r"missing.*single_transformer_blocks\.1\.attn\.to_qkv_mlp_proj\.weight",
            "shape": r"double_stream_modulation_txt\.linear\.weight.*expected \[384, 64\]",
            "extra": r"time_text_embed\.text_embedder\.linear_1\.weight",
        }[case]
        _one_line_error(folder, match)


def test_inputs_of_the_other_family_are_refused(ref):
    model, params = load_transformer(ref.folder)
    args = list(flux_args(ref.inputs))
    with pytest.raises(ValueError, match="no pooled text vector"):
        model.apply({"params": params}, *args[:5], jnp.zeros((BATCH, 8)), args[6])
    with pytest.raises(ValueError, match="img_ids has 3 columns; this model's RoPE takes 4"):
        model.apply({"params": params}, args[0], args[1][..., :3], *args[2:])


# --- configs -------------------------------------------------------------------------------------


def test_hf_config_maps_onto_the_flux2_settings(tmp_path):
    Flux2Transformer2DModel(**CONFIGS["klein_like"]).save_config(tmp_path)
    c = FluxConfig.from_hf_config(tmp_path)
    assert c == FluxConfig(**{**FLUX2_SETTINGS, "context_in_dim": 24, "hidden_size": 48, "num_heads": 3, "depth": 2,
                              "depth_single_blocks": 2, "axes_dim": (4, 4, 4, 4), "guidance_embed": False})
    with pytest.raises(ConfigError, match="timestep_guidance_channels 128 is not supported"):
        FluxConfig.from_hf_config({**Flux2Transformer2DModel.load_config(tmp_path), "timestep_guidance_channels": 128})


def test_flux1_configs_are_unchanged():
    dev = FluxConfig.preset("dev")
    assert (dev.bias, dev.qkv_bias, dev.mlp, dev.shared_modulation, dev.vec_in_dim, dev.id_columns) == (
        True, True, "gelu", False, 768, 3)
    with pytest.raises(ConfigError, match="mlp must be one of"):
        FluxConfig(mlp="relu")


# Published sizes (diffusers' convert_flux2_to_diffusers.py; see FluxConfig.presets) and the
# parameter counts they give, in billions: the "4B", "9B" and 32B of the model names.
PRESET_SIZES = {
    "flux2-klein-4b": (3072, 24, 5, 20, 7680, False, 3.9),
    "flux2-klein-9b": (4096, 32, 8, 24, 12288, False, 9.1),
    "flux2-dev": (6144, 48, 8, 48, 15360, True, 32.2),
}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_named_flux2_configs(name):
    c = FluxConfig.preset(name)
    hidden, heads, depth, single, context, guidance, billions = PRESET_SIZES[name]
    assert (c.hidden_size, c.num_heads, c.head_dim, c.depth, c.depth_single_blocks, c.context_in_dim,
            c.guidance_embed) == (hidden, heads, 128, depth, single, context, guidance)
    assert (c.in_channels, c.mlp_ratio, c.axes_dim, c.theta) == (128, 3.0, (32, 32, 32, 32), 2000)
    shapes = nn.unbox(param_shapes(Flux(c)))
    count = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert round(count / 1e9, 1) == billions, count
    assert transformer_count(c) == count  # the planner's formula from the config fields (fluxjax/plan/counts.py)


# --- logical axes --------------------------------------------------------------------------------


def _parameter_axes(config: FluxConfig) -> set:
    boxed = param_shapes(Flux(config))
    boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) for b in boxes)  # every parameter carries axis names
    return {n for box in boxes for n in box.names} - {None}


def test_flux2_parameters_use_only_flux1s_logical_axes():
    """Every FLUX.2 parameter is named with axes FLUX.1 already uses, so every strategy file
    (fluxjax/configs/sharding/*.toml), which covers FLUX.1, covers FLUX.2."""
    flux2 = _parameter_axes(FluxConfig.preset("flux2-klein-4b"))
    assert flux2 <= _parameter_axes(FluxConfig.preset("tiny")) <= set(PARAMETER_AXES)


def test_full_size_flux2_dev_fsdp_shards_every_kernel_eight_ways():
    abstract = param_shapes(Flux(FluxConfig.preset("flux2-dev")))
    specs, notes = Strategy.load("fsdp").param_specs(abstract, types.SimpleNamespace(shape={"fsdp": 8}))
    assert not notes
    leaves = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=lambda x: hasattr(x, "names"))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(flat_specs)
    for (path, box), spec in zip(leaves, flat_specs):
        if box.value.ndim >= 2 and "kernel" in str(path[-1]):
            assert "fsdp" in tuple(spec), f"{jax.tree_util.keystr(path)} {box.names} not sharded"
