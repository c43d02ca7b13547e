"""LoRA adapters against diffusers' FluxPipeline.load_lora_weights, fused and live.

Each format's file is written the way its tools write it: the diffusers layout by diffusers' and
PEFT's own save functions, the others key by key; diffusers' own loader reads the same file into
its pipeline (set_adapters with weights for several at once). Both pipelines start from the same
noise; pixels on [0, 1] must agree within 1e-3 in float32, as the pipeline without LoRA does
(tests/test_pipeline.py).
"""

import json
import os
import types

import numpy as np
import pytest

import torch

from diffusers import FluxPipeline as DiffusersFluxPipeline  # noqa: E402
from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fluxjax.lora import adapters as lora, fused as lora_fused  # noqa: E402
from fluxjax.sampling import sampler as sampling  # noqa: E402
from fluxjax.errors import NonFiniteError, UsageError  # noqa: E402
from fluxjax.loading.safetensors_io import CheckpointError  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402

HEIGHT, WIDTH = 48, 80
PROMPTS = ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps over the lazy dog"]
T5_LENGTH, STEPS, GUIDANCE = 32, 3, 3.5
RANK = 4

# Every Linear of diffusers' FLUX transformer, as PEFT target names (module-name suffixes).
DIFFUSERS_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder",
    "linear_1", "linear_2",
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_lora")
    reference = make_hub_pipeline(root, "dev")
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    pipe = FluxPipeline.from_pretrained(root, dtype="float32")
    return types.SimpleNamespace(root=root, reference=reference, noise=noise, pipe=pipe,
                                 dir=tmp_path_factory.mktemp("loras"), base=run_reference(reference, noise))


def run_reference(reference, noise, loras=()):
    """diffusers' images with `loras` [(file, weight)] loaded by load_lora_weights and set_adapters."""
    names = []
    for i, (path, _) in enumerate(loras):
        reference.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        reference.set_adapters(names, [w for _, w in loras])
    packed = DiffusersFluxPipeline._pack_latents(noise, len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    try:
        with torch.no_grad():
            return reference(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=packed,
                             max_sequence_length=T5_LENGTH, guidance_scale=GUIDANCE, output_type="np").images
    finally:
        if names:
            reference.unload_lora_weights()


def run_ours(pipe, noise, **kw):
    return pipe(PROMPTS, num_steps=STEPS, guidance=GUIDANCE, latents=noise.numpy(), max_sequence_length=T5_LENGTH,
                output="np", **kw)


def random_pair(gen, out_dim, in_dim, rank=RANK):
    """(down (rank, in), up (out, rank)) large enough to move the pixels visibly."""
    down = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
    up = 0.5 * torch.randn(out_dim, rank, generator=gen) / rank**0.5
    return down, up


def diffusers_lora(hub, name, seed, alpha=8.0, **options):
    """A LoRA on every Linear, made with PEFT on diffusers' transformer and saved by diffusers;
    `options`: more of PEFT's LoraConfig (use_rslora, lora_bias)."""
    transformer = hub.reference.transformer
    config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=DIFFUSERS_TARGETS, alpha_pattern={"proj_mlp": 2.0},
                        init_lora_weights=False, **options)
    transformer.add_adapter(config, adapter_name="make")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n and "make" in n and p.ndim == 1:  # lora_B's bias (lora_bias=True)
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_" in n and "make" in n:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * (0.5 if "lora_B" in n else 1.0))
    state = get_peft_model_state_dict(transformer, adapter_name="make")
    transformer.delete_adapters("make")
    DiffusersFluxPipeline.save_lora_weights(hub.dir, transformer_lora_layers=state, weight_name=name,
                                            transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(hub.dir, name)


def bfl_linears(transformer):
    """(BFL module name, out, in) of the Linears kohya-style trainers adapt, less single_blocks.*.linear1:
    diffusers' kohya reader splits that one with FLUX.1's full-size widths (3072, 12288) whatever
    the model (linear1 is covered by the diffusers/PEFT and XLabs files)."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    m = int(d * 4)
    out = []
    for i in range(cfg.num_layers):
        for s in ("img", "txt"):
            out += [(f"double_blocks.{i}.{s}_attn.qkv", 3 * d, d), (f"double_blocks.{i}.{s}_attn.proj", d, d),
                    (f"double_blocks.{i}.{s}_mlp.0", m, d), (f"double_blocks.{i}.{s}_mlp.2", d, m),
                    (f"double_blocks.{i}.{s}_mod.lin", 6 * d, d)]
    for j in range(cfg.num_single_layers):
        out += [(f"single_blocks.{j}.linear2", d, d + m),
                (f"single_blocks.{j}.modulation.lin", 3 * d, d)]
    return out


def kohya_tensors(hub, seed, prefix="lora_unet_", down="lora_down", up="lora_up", underscores=True, top=False):
    """A kohya/sd-scripts LoRA on the block Linears, or with top=True on those outside the blocks:
    diffusers' kohya reader names those without its "transformer." prefix and its loader then
    drops them, so test_kohya_format checks them against the formula instead."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    linears = bfl_linears(hub.reference.transformer)
    if top:
        d = linears[0][2]
        linears = [("final_layer.linear", 64, d), ("final_layer.adaLN_modulation.1", 2 * d, d), ("img_in", d, 64)]
    for k, (name, o, i) in enumerate(linears):
        key = prefix + (name.replace(".", "_") if underscores else name)
        a, b = random_pair(gen, o, i)
        tensors[f"{key}.{down}.weight"], tensors[f"{key}.{up}.weight"] = a, b
        tensors[f"{key}.alpha"] = torch.tensor(float(2 + k % 5))  # alpha / rank differs per module
    return tensors


def save(hub, name, tensors):
    path = os.path.join(hub.dir, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def xlabs_tensors(hub, seed):
    transformer = hub.reference.transformer
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for s in ("1", "2"):
            for kind, o in (("qkv", 3 * d), ("proj", d)):
                a, b = random_pair(gen, o, d)
                tensors[f"double_blocks.{i}.processor.{kind}_lora{s}.down.weight"] = a
                tensors[f"double_blocks.{i}.processor.{kind}_lora{s}.up.weight"] = b
    for j in range(cfg.num_single_layers):
        for kind, o, i_dim in (("qkv", 3 * d, d), ("proj", d, d + 4 * d)):
            a, b = random_pair(gen, o, i_dim)
            tensors[f"single_blocks.{j}.processor.{kind}_lora.down.weight"] = a
            tensors[f"single_blocks.{j}.processor.{kind}_lora.up.weight"] = b
    return tensors


def check(ours, theirs, base):
    assert np.abs(theirs - base).max() > 2e-2, "the LoRA should change the image, or the comparison proves little"
    assert np.abs(ours - theirs).max() <= 1e-3


def both_ways(hub, loras):
    """fluxjax fused and live with `loras` [(file, scale)] against diffusers; returns live pipe."""
    theirs = run_reference(hub.reference, hub.noise, loras)
    fused = FluxPipeline.from_pretrained(hub.root, dtype="float32", loras=loras, fuse=True)
    check(run_ours(fused, hub.noise), theirs, hub.base)
    live = FluxPipeline.from_pretrained(hub.root, dtype="float32")
    live.load_lora(loras, fuse=False)
    check(run_ours(live, hub.noise), theirs, hub.base)
    return live


def test_diffusers_peft_format(hub):
    path = diffusers_lora(hub, "peft.safetensors", seed=1)
    assert lora.read_lora_file(path, hub.pipe.transformer.model.config)[0] == "diffusers"
    both_ways(hub, [(path, 0.7)])


def test_peft_rslora(hub):
    """use_rslora: PEFT scales B A by alpha / sqrt(r) (4 here), not alpha / r (2)."""
    path = diffusers_lora(hub, "rslora.safetensors", seed=13, use_rslora=True)
    both_ways(hub, [(path, 0.7)])
    t = hub.pipe.transformer
    scale = lora.load_loras([path], t.model.config, t.params).tree["img_in"]["scale"]
    np.testing.assert_array_equal(scale, np.full((1, RANK), 8.0 / RANK**0.5, np.float32))


# PEFT's save warns that a 1-D lora_B tensor may be an unsaved shard: here it is lora_B's bias.
@pytest.mark.filterwarnings("ignore:Adapter 'make'")
def test_peft_lora_bias(hub):
    """lora_bias: PEFT adds lora_B(lora_A(x)) * scaling, so B's bias takes strength x alpha / r too."""
    from safetensors import safe_open

    path = diffusers_lora(hub, "lora_bias.safetensors", seed=14, lora_bias=True)
    with safe_open(path, "np") as f:
        assert sum(k.endswith("lora_B.bias") for k in f.keys()) == sum(k.endswith("lora_B.weight") for k in f.keys())
    both_ways(hub, [(path, 0.7)])


def test_kohya_format(hub):
    path = save(hub, "kohya.safetensors", kohya_tensors(hub, seed=2))
    assert lora.read_lora_file(path, hub.pipe.transformer.model.config)[0] == "kohya"
    both_ways(hub, [(path, 0.8)])
    # The Linears outside the blocks, against W + s * alpha / r * up @ down (BFL names: no swap).
    tensors = kohya_tensors(hub, seed=2, top=True)
    top = save(hub, "kohya_top.safetensors", tensors)
    base = hub.pipe.transformer.params
    fused = lora_fused.fuse(base, lora.load_loras([top], hub.pipe.transformer.model.config, base), [0.8])
    for name, path in (("final_layer_linear", ("final_layer", "linear")), ("img_in", ("img_in",)),
                       ("final_layer_adaLN_modulation_1", ("final_layer", "adaLN_modulation", "1"))):
        key = f"lora_unet_{name}"
        down, up = (tensors[f"{key}.{x}.weight"].numpy() for x in ("lora_down", "lora_up"))
        want = get(base, path) + 0.8 * float(tensors[f"{key}.alpha"]) / RANK * (up @ down).T
        np.testing.assert_allclose(get(fused, path), want, atol=1e-6)


def get(params, path):
    for p in path:
        params = params[p]
    return np.asarray(params["kernel"])


def test_comfyui_format_equals_kohya(hub):
    """BFL keys as ComfyUI writes them (diffusion_model.<BFL name>.lora_A/B): diffusers' loader
    reads only its kohya-style spelling, so the same tensors are checked against that file."""
    tensors = kohya_tensors(hub, seed=3, prefix="diffusion_model.", down="lora_A", up="lora_B", underscores=False)
    path = save(hub, "comfy.safetensors", tensors)
    kohya = save(hub, "kohya3.safetensors", kohya_tensors(hub, seed=3))
    cfg = hub.pipe.transformer.model.config
    assert lora.read_lora_file(path, cfg)[0] == "comfyui"
    params = hub.pipe.transformer.params
    a, b = lora.load_loras([path], cfg, params), lora.load_loras([kohya], cfg, params)
    for x, y in zip(*(lora.jax.tree.leaves(t.tree) for t in (a, b))):
        np.testing.assert_array_equal(x, y)
    both_ways(hub, [(kohya, 1.0)])


def test_xlabs_format(hub):
    path = save(hub, "xlabs.safetensors", xlabs_tensors(hub, seed=4))
    assert lora.read_lora_file(path, hub.pipe.transformer.model.config)[0] == "xlabs"
    both_ways(hub, [(path, 1.0)])


def test_several_loras_and_per_image_scales(hub):
    peft = diffusers_lora(hub, "peft5.safetensors", seed=5, alpha=2.0)
    kohya = save(hub, "kohya6.safetensors", kohya_tensors(hub, seed=6))
    live = both_ways(hub, [(peft, 0.6), (kohya, -0.4)])
    # One batch mixing strengths equals the images one by one.
    table = np.array([[0.6, -0.4], [0.0, 1.0]], np.float32)
    batch = run_ours(live, hub.noise, lora_scales=table)
    for i in range(len(PROMPTS)):
        one = live(PROMPTS[i], num_steps=STEPS, guidance=GUIDANCE, latents=hub.noise[i:i + 1].numpy(),
                   max_sequence_length=T5_LENGTH, output="np", lora_scales=table[i])
        np.testing.assert_allclose(batch[i], one[0], atol=2e-6)
    # Strengths 0 give the model without LoRA.
    np.testing.assert_allclose(run_ours(live, hub.noise, lora_scales=[0.0, 0.0]), run_ours(hub.pipe, hub.noise), atol=2e-6)
    # Other LoRAs of the same ranks, and other strengths, reuse the compiled loop.
    compiled = sampling.denoise._cache_size()
    live.unload_lora()
    live.load_lora([(diffusers_lora(hub, "peft8.safetensors", seed=8, alpha=2.0), 0.3),
                    save(hub, "kohya9.safetensors", kohya_tensors(hub, seed=9))])
    theirs = run_reference(hub.reference, hub.noise, [(os.path.join(hub.dir, "peft8.safetensors"), 0.3),
                                                      (os.path.join(hub.dir, "kohya9.safetensors"), 1.0)])
    check(run_ours(live, hub.noise), theirs, hub.base)
    assert sampling.denoise._cache_size() == compiled
    live.unload_lora()
    np.testing.assert_array_equal(run_ours(live, hub.noise), run_ours(hub.pipe, hub.noise))


def test_bad_files(hub):
    cfg = hub.pipe.transformer.model.config
    sdxl = save(hub, "sdxl.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)})
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors: key 'lora_unet_down_blocks_0_attentions_0_proj_in"):
        lora.read_lora_file(sdxl, cfg)
    tensors = kohya_tensors(hub, seed=7)
    tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.zeros(cfg.hidden_size, RANK + 1)
    with pytest.raises(CheckpointError, match=r"rank.*lora_unet_double_blocks_0_img_attn_proj|lora_unet_double_blocks_0_img_attn_proj.*rank"):
        lora.read_lora_file(save(hub, "rank.safetensors", tensors), cfg)
    tensors = kohya_tensors(hub, seed=7)
    tensors["lora_unet_double_blocks_7_img_attn_proj.lora_down.weight"] = torch.zeros(RANK, cfg.hidden_size)
    tensors["lora_unet_double_blocks_7_img_attn_proj.lora_up.weight"] = torch.zeros(cfg.hidden_size, RANK)
    with pytest.raises(CheckpointError, match=r"depth.safetensors: key 'lora_unet_double_blocks_7_img_attn_proj.*2 double"):
        lora.read_lora_file(save(hub, "depth.safetensors", tensors), cfg)
    te = save(hub, "te.safetensors", {**kohya_tensors(hub, seed=7),
                                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointError, match="text-encoder LoRA"):
        lora.read_lora_file(te, cfg)
    for bad in (sdxl, te):  # the same one line through the pipeline
        with pytest.raises(CheckpointError) as e:
            hub.pipe.load_lora(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no LoRA is loaded"):
        run_ours(hub.pipe, hub.noise, lora_scales=[1.0])


@pytest.mark.slow
def test_cli_generate_batch_and_convert(hub, tmp_path):
    """--lora on generate (fused) and convert (fused into the Orbax transformer), and the batch
    JSONL "loras" field (live, strengths per image, one batch) against the Python API."""
    from PIL import Image

    from fluxjax.commands import cli
    from fluxjax.loading.registry import load_transformer
    from fluxjax.pipeline.pipeline import to_uint8

    peft = diffusers_lora(hub, "peft10.safetensors", seed=10)
    kohya = save(hub, "kohya11.safetensors", kohya_tensors(hub, seed=11))
    size = ["--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS), "--dtype", "float32"]

    out = tmp_path / "one.png"
    assert cli.main(["generate", "a cat", "--model", str(hub.root), "--lora", f"{peft}:0.7", "--seed", "3",
                     "--out", str(out), *size]) == 0
    fused = FluxPipeline.from_pretrained(hub.root, dtype="float32", loras=[(peft, 0.7)])
    want = fused("a cat", height=HEIGHT, width=WIDTH, num_steps=STEPS, seed=3, output="np")
    png = Image.open(out)
    assert png.text["loras"] == "peft10.safetensors:0.7"
    assert np.abs(np.asarray(png).astype(int) - to_uint8(want)[0]).max() <= 1

    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "a cat", "loras": [f"{peft}:0.7"]}, {"prompt": "a dog", "loras": [[kohya, 0.5], peft]},
             {"prompt": "a fox"}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines))
    assert cli.main(["batch", str(prompts), "--model", str(hub.root), "--out-dir", str(tmp_path / "out"),
                     "--batch-size", "3", "--seed", "5", *size]) == 0
    live = FluxPipeline.from_pretrained(hub.root, dtype="float32")
    live.load_lora([peft, kohya])
    for k, (prompt, row) in enumerate((("a cat", [0.7, 0]), ("a dog", [1.0, 0.5]), ("a fox", [0, 0]))):
        want = live(prompt, height=HEIGHT, width=WIDTH, num_steps=STEPS, seed=5 + k, output="np", lora_scales=row)
        got = np.asarray(Image.open(tmp_path / "out" / f"{k:06d}.png")).astype(int)
        assert np.abs(got - to_uint8(want)[0]).max() <= 1, prompt

    dst = tmp_path / "fused"
    assert cli.main(["convert", str(hub.root), str(dst), "--dtype", "float32", "--lora", f"{kohya}:0.5"]) == 0
    model, base = load_transformer(os.path.join(hub.root, "transformer"))
    want = lora_fused.fuse(base, lora.load_loras([kohya], model.config, base), [0.5])
    _, got = load_transformer(dst / "transformer")
    for x, y in zip(lora.jax.tree.leaves(got), lora.jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def control_norm_scales(cfg, gen) -> dict:
    """The full replacement QK-norm scales of a BFL control LoRA, for every block of a diffusers
    transformer config (BFL names), drawn from `gen`."""
    tensors = {}
    for stack, layers, norms in (("double_blocks", cfg.num_layers, ("img_attn.norm", "txt_attn.norm")),
                                 ("single_blocks", cfg.num_single_layers, ("norm",))):
        for i in range(layers):
            for norm in norms:
                for n in ("query_norm", "key_norm"):
                    tensors[f"{stack}.{i}.{norm}.{n}.scale"] = 1 + 0.3 * torch.randn(cfg.attention_head_dim, generator=gen)
    return tensors


def control_tensors(hub, seed, in_channels=64):
    """A BFL control LoRA as FLUX.1-Canny/Depth-dev-lora lays it out: BFL names, lora_A/lora_B
    with a lora_B.bias, and full replacement QK-norm scales (no diffusers check: its reader
    assumes FLUX.1's 19/38 blocks and width 3072)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    cfg = hub.reference.transformer.config
    d = hub.reference.transformer.inner_dim
    linears = bfl_linears(hub.reference.transformer) + [("img_in", d, in_channels)]
    linears += [(f"single_blocks.{j}.linear1", 7 * d, d) for j in range(cfg.num_single_layers)]
    linears += [("final_layer.linear", 64, d), ("final_layer.adaLN_modulation.1", 2 * d, d)]
    for name, o, i in linears:
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = random_pair(gen, o, i)
        tensors[f"{name}.lora_B.bias"] = 0.1 * torch.randn(o, generator=gen)
    tensors.update(control_norm_scales(cfg, gen))
    return tensors


def test_bfl_control_format(hub):
    """Fused params against W + s (B A + b) and the replaced norms; live images equal fused ones."""
    tensors = control_tensors(hub, seed=12)
    path = save(hub, "control.safetensors", tensors)
    t = hub.pipe.transformer
    assert lora.read_lora_file(path, t.model.config)[0] == "bfl_control"
    fused = lora_fused.fuse(t.params, lora.load_loras([path], t.model.config, t.params), [0.9])
    for name in ("double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"):
        parts = name.split(".")
        stacked = parts[0] in ("double_blocks", "single_blocks")  # block i is slice i of the stack
        path_, pick = (parts[:1] + parts[2:], lambda a, i=int(parts[1]): a[i]) if stacked else (parts, lambda a: a)
        down, up, bias = (tensors[f"{name}.lora_{x}"].numpy() for x in ("A.weight", "B.weight", "B.bias"))
        node_base, node_fused = t.params, fused
        for p in path_:
            node_base, node_fused = node_base[p], node_fused[p]
        np.testing.assert_allclose(pick(node_fused["kernel"]), pick(node_base["kernel"]) + 0.9 * (up @ down).T, atol=1e-6)
        np.testing.assert_allclose(pick(node_fused["bias"]), pick(node_base["bias"]) + 0.9 * bias, atol=1e-6)
    np.testing.assert_array_equal(fused["single_blocks"]["norm"]["key_norm"]["scale"][1],
                                  tensors["single_blocks.1.norm.key_norm.scale"].numpy())
    live = FluxPipeline.from_pretrained(hub.root, dtype="float32")
    live.load_lora([(path, 0.9)])
    fused_pipe = FluxPipeline.from_pretrained(hub.root, dtype="float32", loras=[(path, 0.9)])
    ours = run_ours(fused_pipe, hub.noise)
    assert np.abs(ours - hub.base).max() > 2e-2
    np.testing.assert_allclose(run_ours(live, hub.noise), ours, atol=1e-4)
    wide = save(hub, "canny.safetensors", control_tensors(hub, seed=12, in_channels=128))
    # Refused where nothing widens the model (a control LoRA goes through FluxPipeline.load_lora,
    # tests/test_fill_control.py).
    with pytest.raises(UsageError, match=r"canny.safetensors: key 'img_in.lora_B.weight' widens img_in to 128"):
        lora.load_loras([wide], t.model.config, t.params)


# --- non-finite inputs: refused in one line before they reach the weights -----------------------

STRENGTH_NOTE = "(strengths in use lie within about +-2)"
BAD_STRENGTHS = (("nan", "nan is not a finite number"), ("inf", "inf is not a finite number"),
                 ("-inf", "-inf is not a finite number"), ("1e38", "1e+38 is beyond +-10000"),
                 ("1e300", "1e+300 is beyond +-10000"))


def cli_run(argv, capsys):
    from fluxjax.commands import cli

    code = cli.main(argv)
    return code, capsys.readouterr().err


def tree_bytes(root):
    """{relative path: bytes} of every file below `root`."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_non_finite_strengths_refused_before_loading(hub, tmp_path, capsys):
    """N72: nan, inf, -inf, 1e38, 1e300 as a strength: one line naming the argument, exit 2, before
    any file is read (the Python API's file does not even exist), nothing written."""
    good = save(hub, "good.safetensors", kohya_tensors(hub, seed=7))
    for text, why in BAD_STRENGTHS:
        with pytest.raises(UsageError) as e:
            lora.parse_lora_arg(f"{good}:{text}")
        assert str(e.value) == f"--lora '{good}:{text}': the LoRA strength {why} {STRENGTH_NOTE}"
    assert lora.parse_lora_arg(f"{good}:-1e4") == (good, -1e4)  # the bound itself is taken

    out = tmp_path / "nan.png"
    code, err = cli_run(["generate", "a cat", "--model", str(hub.root), "--lora", f"{good}:nan", "--out", str(out)],
                        capsys)
    assert (code, err) == (2, f"fluxjax generate: error: --lora '{good}:nan': the LoRA strength nan is not a finite "
                              f"number {STRENGTH_NOTE}\n")
    dst = tmp_path / "conv"
    code, err = cli_run(["convert", str(hub.root), str(dst), "--lora", f"{good}:1e38"], capsys)
    assert (code, err) == (2, f"fluxjax convert: error: --lora '{good}:1e38': the LoRA strength 1e+38 is beyond "
                              f"+-10000 {STRENGTH_NOTE} ({dst} not created)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "loras": [[good, float("nan")]]}) + "\n")
    code, err = cli_run(["batch", str(prompts), "--model", str(hub.root), "--out-dir", str(tmp_path / "out")], capsys)
    assert (code, err) == (2, f"fluxjax batch: error: {prompts}:1: loras item [{good!r}, nan]: the LoRA strength nan "
                              f"is not a finite number {STRENGTH_NOTE}\n")
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]

    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(UsageError, match=rf"^load_lora {missing}: the LoRA strength inf is not a finite number"):
        FluxPipeline.from_pretrained(hub.root, dtype="float32", loras=[(missing, float("inf"))])
    live = FluxPipeline.from_pretrained(hub.root, dtype="float32")
    live.load_lora(good)
    with pytest.raises(UsageError) as e:
        run_ours(live, hub.noise, lora_scales=[[0.5], [float("nan")]])
    assert str(e.value) == f"lora_scales: the LoRA strength nan is not a finite number {STRENGTH_NOTE}"


def test_non_finite_lora_files_refused_naming_the_key(hub, tmp_path, capsys):
    """N71: a NaN tensor, an fp16 inf, a NaN `.alpha`, a NaN lora_alpha in PEFT's metadata: one
    line naming the file and key when the file is read, through the pipeline and the CLI."""
    cfg = hub.pipe.transformer.model.config
    key = "lora_unet_double_blocks_0_img_attn_proj"
    size = RANK * cfg.hidden_size
    nan = kohya_tensors(hub, seed=7)
    nan[f"{key}.lora_down.weight"][0, :3] = float("nan")
    inf16 = kohya_tensors(hub, seed=7)
    inf16[f"{key}.lora_up.weight"] = inf16[f"{key}.lora_up.weight"].half()
    inf16[f"{key}.lora_up.weight"][1, 1] = float("inf")
    alpha = kohya_tensors(hub, seed=7)
    alpha[f"{key}.alpha"] = torch.tensor(float("nan"))
    for name, tensors, bad, count in (("nan", nan, "lora_down.weight", f"3 NaN or infinite value(s) of {size}"),
                                      ("inf16", inf16, "lora_up.weight", f"1 NaN or infinite value(s) of {size}"),
                                      ("alphanan", alpha, "alpha", "1 NaN or infinite value(s) of 1")):
        path = save(hub, f"{name}.safetensors", tensors)
        want = f"{path}: key '{key}.{bad}' holds {count}: a damaged or overflowed LoRA"
        with pytest.raises(CheckpointError) as e:
            hub.pipe.load_lora(path)
        assert str(e.value) == want
    out = tmp_path / "x.png"
    code, err = cli_run(["generate", "a cat", "--model", str(hub.root), "--lora", path, "--out", str(out)], capsys)
    # read after the model loads (its progress line first), before anything is computed
    assert (code, err) == (2, f"loading {hub.root} ...\nfluxjax generate: error: {want}\n") and not out.exists()

    from safetensors.numpy import save_file

    peft = str(tmp_path / "peft_nan.safetensors")
    save_file({"transformer.x_embedder.lora_A.weight": np.zeros((RANK, 64), np.float32),
               "transformer.x_embedder.lora_B.weight": np.zeros((cfg.hidden_size, RANK), np.float32)}, peft,
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": RANK,
                                                             "transformer.lora_alpha": float("nan")})})
    with pytest.raises(CheckpointError) as e:
        lora.read_lora_file(peft, cfg)
    assert str(e.value) == (f"{peft}: metadata lora_adapter_metadata transformer.lora_alpha is nan, "
                            "not a finite number")


def overflowing(hub, name):
    """A finite LoRA whose update overflows float32: up @ down = 4e40 on double block 0's img proj."""
    d = hub.pipe.transformer.model.config.hidden_size
    key = "lora_unet_double_blocks_0_img_attn_proj"
    return save(hub, name, {f"{key}.lora_down.weight": torch.full((RANK, d), 1e20),
                            f"{key}.lora_up.weight": torch.full((d, RANK), 1e20)})


def test_non_finite_fused_leaf_never_written(hub, tmp_path, capsys):
    """N73-N75: a fused leaf with NaN or infinite values is refused naming the leaf, in memory
    and by `convert --lora`, which then writes no checkpoint and leaves a good one byte for byte."""
    big = overflowing(hub, "huge.safetensors")
    t = hub.pipe.transformer
    with pytest.raises(NonFiniteError) as e:
        lora_fused.fuse(t.params, lora.load_loras([big], t.model.config, t.params), [1.0])
    assert str(e.value) == ("fusing huge.safetensors:1 into double_blocks/img_attn/proj/kernel gave NaN or infinite "
                            "values (the update overflows this weight); lower the strength")

    good = save(hub, "good2.safetensors", kohya_tensors(hub, seed=7))
    dst = tmp_path / "fused"
    assert cli_run(["convert", str(hub.root), str(dst), "--lora", f"{good}:0.8"], capsys)[0] == 0
    before = tree_bytes(dst)
    for target, extra in ((dst, ["--overwrite"]), (tmp_path / "new", [])):
        code, err = cli_run(["convert", str(hub.root), str(target), "--lora", big, *extra], capsys)
        outcome = f"{target} left as it was" if extra else f"{target} not created"
        assert (code, err) == (2, "fluxjax convert: error: fusing huge.safetensors:1 into double_blocks/img_attn/proj/"
                                  "kernel gave NaN or infinite values (the update overflows this weight); lower the "
                                  f"strength ({outcome})\n")
    assert tree_bytes(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["fused"]  # no staging folder left, nothing at "new"
