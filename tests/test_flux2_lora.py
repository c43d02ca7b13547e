"""FLUX.2 [klein] LoRAs against diffusers' Flux2KleinPipeline.load_lora_weights, fused and live.

The layouts published for FLUX.2 (diffusers 0.42.1's Flux2LoraLoaderMixin reads them): diffusers'
own (PEFT on Flux2Transformer2DModel, saved by save_lora_weights), ai-toolkit's BFL keys
(`diffusion_model.<BFL module>.lora_A/B`, no alpha), kohya/musubi's (`lora_unet_<BFL module>
.lora_down/up` + `.alpha`), and ComfyUI's BFL keys with `lora_down/up` + `.alpha`, which diffusers
0.42.1 sends to its kohya converter and drops: that file is checked against the same LoRA with
alpha/rank baked into lora_B in ai-toolkit's layout. The tiny klein hub folder is
test_flux2_pipeline's; pixels on [0, 1] in float32 from the same latents, within 1e-3.
"""

from __future__ import annotations

import copy
import os

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusers import Flux2KleinPipeline
from fluxjax.errors import CheckpointError
from fluxjax.lora import adapters as lora, fused as lora_fused
from fluxjax.sampling import sampler as sampling
from test_flux2_pipeline import LENGTH, PIXEL_TOL, PROMPTS, _latents, klein  # noqa: F401

HEIGHT, WIDTH, STEPS, RANK = 32, 48, 2, 4
PROMPT = PROMPTS[1]
# Which BFL Linears each non-diffusers file adapts. diffusers' kohya converter reads these (and
# drops the modulations); its ai-toolkit converter maps final_layer.adaLN_modulation.1 to norm_out
# without swapping BFL's (shift, scale) into diffusers' (scale, shift), so that one is checked
# against W + B A instead (test_linears_diffusers_misreads_are_fused_in_bfl_order).
KOHYA_LINEARS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear",
                 "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                 "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
                 "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                 "single_blocks.0.linear2")
BFL_LINEARS = KOHYA_LINEARS + ("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                               "single_stream_modulation.lin")

pytestmark = pytest.mark.parametrize("klein", ["distilled"], indirect=True)  # one klein: LoRAs apply alike


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("flux2_loras")


def _node(params, bfl_name):
    """The parameters of the BFL Linear `bfl_name` in fluxjax's tree (blocks stacked)."""
    node = params
    for part in bfl_name.split("."):
        node = node.get(part, node)  # a block index is no level of the stacked tree
    return node


def _kernel_shape(params, bfl_name):
    """(out, in) of the BFL Linear `bfl_name` (fluxjax's kernels are (in, out))."""
    return tuple(_node(params, bfl_name)["kernel"].shape[-2:][::-1])


def _pairs(klein, names, seed):
    """{BFL name: (down (rank, in), up (out, rank), alpha)} large enough to move the pixels."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, name in enumerate(names):
        o, i = _kernel_shape(klein.pipe.transformer.params, name)
        down = torch.randn(RANK, i, generator=gen) / i**0.5
        up = 0.5 * torch.randn(o, RANK, generator=gen) / RANK**0.5
        out[name] = (down, up, float(2 + k % 5))  # alpha / rank differs per module
    return out


def _save(files, name, tensors):
    path = os.path.join(files, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _ai_toolkit(files, name, pairs, baked=False):
    """ai-toolkit's layout: diffusion_model.<BFL>.lora_A/B, no alpha (baked: alpha/rank into B)."""
    tensors = {}
    for n, (down, up, alpha) in pairs.items():
        tensors[f"diffusion_model.{n}.lora_A.weight"] = down
        tensors[f"diffusion_model.{n}.lora_B.weight"] = up * (alpha / RANK if baked else 1.0)
    return _save(files, name, tensors)


def _down_up(files, name, pairs, prefix, underscores):
    """kohya's (lora_unet_, '.' -> '_') or ComfyUI's (diffusion_model.) lora_down/up + alpha."""
    tensors = {}
    for n, (down, up, alpha) in pairs.items():
        key = prefix + (n.replace(".", "_") if underscores else n)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return _save(files, name, tensors)


def _diffusers(klein, files, name, seed):
    """A LoRA on every Linear of diffusers' Flux2Transformer2DModel, made with PEFT and saved by
    diffusers (its PEFT config, with an alpha_pattern, in the file's metadata)."""
    transformer = klein.ref.transformer
    targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=RANK, lora_alpha=8.0, target_modules=targets, init_lora_weights=False,
                        alpha_pattern={"single_transformer_blocks.0.attn.to_qkv_mlp_proj": 2.0})
    transformer.add_adapter(config, adapter_name="make")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n and "make" in n:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1]**0.5 * (0.5 if "lora_B" in n else 1.0))
    state = get_peft_model_state_dict(transformer, adapter_name="make")
    transformer.delete_adapters("make")
    Flux2KleinPipeline.save_lora_weights(files, transformer_lora_layers=state, weight_name=name,
                                         transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(files, name)


def _reference(klein, loras):
    """diffusers' pixels with `loras` [(file, weight)] (load_lora_weights, set_adapters)."""
    names = []
    for i, (path, _) in enumerate(loras):
        klein.ref.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        klein.ref.set_adapters(names, [w for _, w in loras])
    try:
        with torch.no_grad():
            return klein.ref(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                             latents=_latents(1, HEIGHT, WIDTH), max_sequence_length=LENGTH,
                             output_type="np").images
    finally:
        if names:
            klein.ref.unload_lora_weights()


def _ours(pipe, **kw):
    return pipe(PROMPT, HEIGHT, WIDTH, num_steps=STEPS, latents=_latents(1, HEIGHT, WIDTH).numpy(),
                max_sequence_length=LENGTH, output="np", **kw)


@pytest.fixture(scope="module")
def made(klein, files):
    """The four files (format -> (path, the file diffusers reads for it)) and diffusers' pixels without LoRA."""
    bfl = _pairs(klein, BFL_LINEARS, 1)
    kohya = _down_up(files, "kohya.safetensors", _pairs(klein, KOHYA_LINEARS, 2), "lora_unet_", True)
    comfy = _pairs(klein, BFL_LINEARS, 3)
    loras = {"diffusers": (_diffusers(klein, files, "peft.safetensors", 4),) * 2,
             "comfyui": (_ai_toolkit(files, "ai_toolkit.safetensors", bfl),) * 2,
             "kohya": (kohya, kohya),
             "comfyui down/up": (_down_up(files, "comfy.safetensors", comfy, "diffusion_model.", False),
                                 _ai_toolkit(files, "comfy_baked.safetensors", comfy, baked=True))}
    return loras, _reference(klein, [])


def _check(ours, theirs, base, what):
    err = float(np.abs(ours - theirs).max())
    print(f"{what}: max |pixel error| {err:.2e}, the LoRA moves the pixels by {np.abs(theirs - base).max():.3f}")
    assert np.abs(theirs - base).max() > 2e-2  # the LoRA changes the image, or the comparison proves little
    assert err < PIXEL_TOL


def test_formats_fused_and_live_match_diffusers(klein, made):  # noqa: F811
    """One LoRA of each layout, each at its own strength, fused and then live, against diffusers
    running the four adapters at once (set_adapters): a layout read wrongly moves the pixels by
    about its LoRA's own effect (0.3 to 1 here), far beyond 1e-3."""
    loras, base = made
    cfg = klein.pipe.transformer.model.config
    assert [lora.read_lora_file(ours, cfg)[0] for ours, _ in loras.values()] == [f.split()[0] for f in loras]
    strengths = (0.7, -0.5, 0.6, 0.9)
    ours = [(path, s) for (path, _), s in zip(loras.values(), strengths)]
    theirs = _reference(klein, [(path, s) for (_, path), s in zip(loras.values(), strengths)])
    fused = copy.copy(klein.pipe)  # fusing replaces the copy's transformer, not the fixture's
    fused.load_lora(ours, fuse=True)
    _check(_ours(fused), theirs, base, "four fused")
    live = copy.copy(klein.pipe)
    live.load_lora(ours, fuse=False)
    _check(_ours(live), theirs, base, "four live")
    # Strengths 0 give the model without LoRA, with the compiled loop reused.
    compiled = sampling.denoise._cache_size()
    np.testing.assert_allclose(_ours(live, lora_scales=[0.0] * 4), _ours(klein.pipe), atol=2e-6)
    assert sampling.denoise._cache_size() == compiled


@pytest.mark.parametrize("prefix, underscores", [("diffusion_model.", False), ("lora_unet_", True)])
def test_linears_diffusers_misreads_are_fused_in_bfl_order(klein, files, prefix, underscores):  # noqa: F811
    """final_layer.adaLN_modulation.1 (diffusers' ai-toolkit converter does not swap BFL's (shift,
    scale) into norm_out's (scale, shift)) and a shared modulation (its kohya converter drops
    those) are fused as W + s alpha/r (up @ down), in BFL's layout, which fluxjax keeps."""
    names = ("final_layer.adaLN_modulation.1", "single_stream_modulation.lin")
    pairs = _pairs(klein, names, 5)
    path = _down_up(files, f"{prefix}bfl_order.safetensors", pairs, prefix, underscores)
    t = klein.pipe.transformer
    fused = lora_fused.fuse(t.params, lora.load_loras([path], t.model.config, t.params), [0.8])
    for name, (down, up, alpha) in pairs.items():
        kernel = lambda p: np.asarray(_node(p, name)["kernel"])  # noqa: E731
        want = kernel(t.params) + 0.8 * alpha / RANK * (up @ down).numpy().T
        np.testing.assert_allclose(kernel(fused), want, atol=1e-6)


def test_ai_toolkit_diffusers_block_names_read_as_diffusers(klein, files):  # noqa: F811
    """diffusion_model.<diffusers block module> (ai-toolkit, SimpleTuner): the adapters of the same
    tensors under diffusers' transformer. prefix, which test_formats_fused_and_live_match_diffusers checks."""
    modules = dict(klein.ref.transformer.named_modules())
    gen = torch.Generator().manual_seed(6)
    tensors = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                 "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"):
        o, i = modules[name].weight.shape
        tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, i, generator=gen)
        tensors[f"{name}.lora_B.weight"] = torch.randn(o, RANK, generator=gen)
    t = klein.pipe.transformer
    read = [lora.load_loras([_save(files, f"{p}names.safetensors", {p + k: v for k, v in tensors.items()})],
                            t.model.config, t.params) for p in ("diffusion_model.", "transformer.")]
    assert read[0].formats == ("comfyui",) and read[1].formats == ("diffusers",)
    for x, y in zip(*(jax.tree.leaves(r.tree) for r in read)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("key, match", [
    ("diffusion_model.double_blocks.0.img_attn.qkv_x.lora_A.weight", "block this model lacks or a module"),
    ("diffusion_model.input_blocks.1.proj_in.lora_A.weight", "names no FLUX transformer module"),  # an SD UNet's
    # FLUX.1's diffusers name: FLUX.2's single block has no separate proj_mlp
    ("transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight", "block this model lacks or a module"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1", "LoKr"),
    ("lora_unet_double_blocks_0_img_mod_lin.lora_down.weight", "block this model lacks or a module"),  # FLUX.1's
])
def test_unknown_keys_refused_in_one_line(klein, files, key, match):  # noqa: F811
    up = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    path = _save(files, "bad.safetensors", {key: torch.zeros(RANK, 32), up: torch.zeros(32, RANK)})
    with pytest.raises(CheckpointError, match=match) as e:
        klein.pipe.load_lora(path)
    assert "\n" not in str(e.value) and (key in str(e.value) or up in str(e.value))
