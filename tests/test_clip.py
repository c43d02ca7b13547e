"""CLIP text encoder: parity with transformers' CLIPTextModel, the key table, strict loading.

Small random CLIPTextModels are saved with save_pretrained and loaded with fluxjax.loading.clip.load_clip;
outputs are compared on the same ids. Full size is checked without weights (eval_shape vs the
transformers model built on the meta device).
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from safetensors.numpy import load_file, save_file

from fluxjax.loading.clip import clip_rules
from fluxjax.loading.registry import load_clip
from fluxjax.loading.safetensors_io import CheckpointError
from fluxjax.loading.table import table_keys
from fluxjax.config import CLIPConfig
from fluxjax.models.clip import CLIPTextEncoder, param_shapes

import transformers

torch.set_num_threads(1)

VOCAB, BOS, EOS_LEGACY = 120, 118, 119  # legacy layout: <|endoftext|> is the largest id
EOS_REAL, PAD_REAL = 60, 0  # a real eos id in the middle of the vocabulary, its own pad id
MAX_POS = 24

# The hub's FLUX.1 text_encoder/config.json (CLIP-L/14 text tower, saved by transformers 4.43).
CLIP_L_HUB_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "bfloat16",
    "vocab_size": 49408,
}


def _tiny_hf_config(eos_token_id: int, hidden_act: str):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        pad_token_id=PAD_REAL if eos_token_id != 2 else EOS_LEGACY,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of order one everywhere (LayerNorm scales and biases too), so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or "final_layer_norm.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim == 2:
                p.copy_(noise / np.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * noise)


def _ids(eos: int, pad: int, lengths=(5, 24, 11), seed: int = 0) -> np.ndarray:
    """A batch of 'prompts' of different lengths: [BOS, content..., EOS, pad...], width MAX_POS.

    Content ids are drawn from the whole vocabulary below BOS, so in the real-eos layout
    many content ids are larger than EOS (argmax pooling would pick the wrong position).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        content = rng.integers(1, BOS, size=n - 2)
        content[content == eos] = eos + 1
        row = np.full(MAX_POS, pad, np.int64)
        row[0], row[1 : n - 1], row[n - 1] = BOS, content, eos
        rows.append(row)
    return np.stack(rows)


@pytest.fixture(scope="module", params=[("legacy", 2, "quick_gelu"), ("real_eos", EOS_REAL, "gelu")], ids=lambda p: p[0])
def saved(request, tmp_path_factory):
    """(folder, torch model, ids, pad id) for one tiny random CLIPTextModel saved with save_pretrained."""
    name, eos_id, act = request.param
    model = transformers.CLIPTextModel(_tiny_hf_config(eos_id, act)).eval()
    _randomize(model, seed=len(name))
    folder = tmp_path_factory.mktemp(f"clip_{name}")
    model.save_pretrained(folder)
    if eos_id == 2:
        ids = _ids(EOS_LEGACY, EOS_LEGACY)  # CLIP pads with <|endoftext|>
    else:
        ids = _ids(EOS_REAL, PAD_REAL)
    return folder, model, ids


def _torch_out(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return out.last_hidden_state.float().numpy(), out.pooler_output.float().numpy()


def _jax_out(model, params, ids):
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    h, pooled = fn(params, jnp.asarray(ids, jnp.int32))
    return np.asarray(h.astype(jnp.float32)), np.asarray(pooled.astype(jnp.float32))


def test_fp32_matches_transformers(saved):
    folder, tmodel, ids = saved
    ref_h, ref_p = _torch_out(tmodel, ids)
    model, params = load_clip(folder, dtype="float32")
    h, p = _jax_out(model, params, ids)
    assert h.shape == ref_h.shape and p.shape == ref_p.shape
    err_h, err_p = np.abs(h - ref_h).max(), np.abs(p - ref_p).max()
    print(f"fp32 max abs err: last_hidden {err_h:.3g} (ref max {np.abs(ref_h).max():.3g}), pooled {err_p:.3g}")
    assert err_h <= 1e-5 * np.abs(ref_h).max()
    assert err_p <= 1e-5 * np.abs(ref_p).max()
    # Shorter inputs than max_position_embeddings: positions 0..L-1.
    h16, p16 = _jax_out(model, params, ids[:, :16])
    ref16_h, ref16_p = _torch_out(tmodel, ids[:, :16])
    assert np.abs(h16 - ref16_h).max() <= 1e-5 * np.abs(ref16_h).max()
    assert np.abs(p16 - ref16_p).max() <= 1e-5 * np.abs(ref16_p).max()


def test_pooling_position(saved):
    """The pooled vector is the hidden state at transformers' pooling position for each mode."""
    folder, tmodel, ids = saved
    model, params = load_clip(folder)
    h, p = _jax_out(model, params, ids)
    eos = model.config.eos_token_id
    if eos == 2:
        want = ids.argmax(-1)
    else:
        want = (ids == eos).argmax(-1)
        assert (ids.argmax(-1) != want).any(), "test ids should tell the two pooling modes apart"
    np.testing.assert_array_equal(p, h[np.arange(len(ids)), want])


def test_bf16_error_not_worse_than_pytorch(saved):
    folder, tmodel, ids = saved
    ref_h, ref_p = _torch_out(tmodel, ids)
    t_h, t_p = _torch_out(transformers.CLIPTextModel.from_pretrained(folder, dtype=torch.bfloat16).eval(), ids)
    model, params = load_clip(folder, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.bfloat16
    j_h, j_p = _jax_out(model, params, ids)
    for name, ref, t, j in (("last_hidden", ref_h, t_h, j_h), ("pooled", ref_p, t_p, j_p)):
        err_t, err_j = np.abs(t - ref).max(), np.abs(j - ref).max()
        print(f"bf16 {name}: pytorch err {err_t:.4g}, fluxjax err {err_j:.4g}")
        assert err_j <= 1.5 * err_t, (name, err_j, err_t)


def test_hub_layout_prefix_and_position_ids(saved, tmp_path):
    """Files from transformers < 5 prefix keys with text_model. and may hold position_ids."""
    folder, tmodel, ids = saved
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    old = {"text_model." + k: v for k, v in tensors.items()}
    old["text_model.embeddings.position_ids"] = np.arange(MAX_POS, dtype=np.int64)[None]
    dst = tmp_path / "old"
    dst.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), dst / "config.json")
    save_file(old, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model, params = load_clip(dst)
    ref_h, ref_p = _torch_out(tmodel, ids)
    h, p = _jax_out(model, params, ids)
    assert np.abs(h - ref_h).max() <= 1e-5 * np.abs(ref_h).max()

    old["text_model.embeddings.position_ids"] = np.arange(MAX_POS, dtype=np.int64)[None][:, ::-1].copy()
    save_file(old, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*text_model\.embeddings\.position_ids"):
        load_clip(dst)


def _broken_copy(folder, tmp_path, edit):
    dst = tmp_path / "broken"
    dst.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), dst / "config.json")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"), r"missing.*encoder\.layers\.1\.mlp\.fc2\.bias"),
        (lambda t: t.__setitem__("text_projection.weight", np.zeros((4, 4), np.float32)), r"text_projection\.weight"),
        (
            lambda t: t.__setitem__("encoder.layers.0.self_attn.k_proj.weight", np.zeros((32, 31), np.float32)),
            r"encoder\.layers\.0\.self_attn\.k_proj\.weight.*\[32, 31\].*expected \[32, 32\]",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_strict_errors_name_file_and_key(saved, tmp_path, edit, pattern):
    folder, _, _ = saved
    dst = _broken_copy(folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_clip(dst)
    assert str(dst) in str(info.value)


def test_too_long_input_raises(saved):
    folder, _, _ = saved
    model, params = load_clip(folder)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, jnp.zeros((1, MAX_POS + 1), jnp.int32))


def test_params_carry_logical_axes():
    model = CLIPTextEncoder(CLIPConfig.preset("tiny"))
    shapes = param_shapes(model)
    leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    assert leaves and all(isinstance(x, meta.Partitioned) for x in leaves)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0]:
        assert len(leaf.names) == leaf.value.ndim
        if path[0].key == "layers":
            assert leaf.names[0] == "layers" and leaf.value.shape[0] == model.config.num_layers


def test_full_size_clip_l_without_weights():
    cfg = CLIPConfig.from_hf_config(CLIP_L_HUB_CONFIG)
    assert cfg == CLIPConfig.preset("large")
    shapes = meta.unbox(param_shapes(CLIPTextEncoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))

    hf_cfg = transformers.CLIPTextConfig(**{k: v for k, v in CLIP_L_HUB_CONFIG.items() if k != "architectures"})
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(hf_cfg)
    state = ref.state_dict()
    assert ours == sum(t.numel() for t in state.values()) == 123_060_480

    table = table_keys(clip_rules(cfg))
    assert len(table) == len(set(table))
    assert sorted(table) == sorted(state), (sorted(set(state) - set(table)), sorted(set(table) - set(state)))
    # And each key's shape is what the rule's target expects (PyTorch layout).
    flat = {"/".join(k): v for k, v in _flatten(shapes)}
    for rule in clip_rules(cfg):
        for i, key in enumerate(rule.all_keys()):
            want = flat[rule.target].shape[1:] if rule.layers else flat[rule.target].shape
            if rule.transform == "linear":
                want = want[::-1]
            assert tuple(state[key].shape) == tuple(want), key


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla():
    from fluxjax.models.attention import dot_product_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 77, 12, 64), jnp.bfloat16) for i in range(3))
    want = dot_product_attention(q, k, v, causal=True, implementation="xla").astype(jnp.float32)
    got = dot_product_attention(q, k, v, causal=True, implementation="cudnn").astype(jnp.float32)
    assert float(jnp.abs(got - want).max()) <= 2e-2
