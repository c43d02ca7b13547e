"""T5 v1.1 encoder: parity with transformers' PyTorch T5EncoderModel, strict loading, full size.

Reference models are small random configs saved with save_pretrained; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta as flax_meta

import torch
import transformers
from safetensors.numpy import load_file, save_file  # noqa: E402

from fluxjax.loading.safetensors_io import CheckpointError  # noqa: E402
from fluxjax.loading.registry import load_t5  # noqa: E402
from fluxjax.loading.t5 import EMBED_ALIAS, EMBED_KEY, t5_rules  # noqa: E402
from fluxjax.loading.table import TRANSFORMS, table_keys  # noqa: E402
from fluxjax.config import T5Config  # noqa: E402
from fluxjax.models.t5 import T5Encoder, relative_position_buckets  # noqa: E402
from fluxjax.models.t5 import param_shapes as t5_param_shapes  # noqa: E402

# Two shapes of config: A has more buckets than its sequence can reach (every distance gets an
# exact bucket, most rows of the table go unused); B has few buckets and a sequence longer
# than max_distance (logarithmic buckets and the clamp), d_kv * heads != d_model, and is
# saved in several shards.
CONFIG_A = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                relative_attention_num_buckets=64, relative_attention_max_distance=20)
CONFIG_B = dict(vocab_size=61, d_model=40, d_kv=6, d_ff=56, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)
LENGTH_A, LENGTH_B = 12, 40


def hf_config(**fields) -> "transformers.T5Config":
    return transformers.T5Config(feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, **fields)


def make_reference(fields: dict, seed: int) -> "transformers.T5EncoderModel":
    """A random T5EncoderModel whose norm scales and position bias are far from their init
    (ones / small), so a mix-up of either shows in the output."""
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(hf_config(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


def reference_output(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.float().numpy()


def random_ids(vocab: int, length: int, seed: int, batch: int = 2) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)
    ids[1, length // 2 :] = 0  # pad tail, attended to like FLUX does
    return ids


@pytest.fixture(scope="module")
def saved_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_a")
    model = make_reference(CONFIG_A, seed=0)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def saved_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_b")
    model = make_reference(CONFIG_B, seed=1)
    model.save_pretrained(path, max_shard_size="20KB")
    return path, model


def run_fluxjax(path, ids, dtype="float32") -> np.ndarray:
    model, params = load_t5(path, dtype=dtype)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert out.dtype == jnp.dtype(dtype) and out.shape == ids.shape + (model.config.d_model,)
    return np.asarray(out.astype(jnp.float32))


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["a", "b"])
def test_fp32_matches_transformers(which, saved_a, saved_b):
    path, ref_model = saved_a if which == "a" else saved_b
    fields, length = (CONFIG_A, LENGTH_A) if which == "a" else (CONFIG_B, LENGTH_B)
    if which == "b":
        assert os.path.exists(path / "model.safetensors.index.json"), "config B should be saved sharded"
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    ids = random_ids(fields["vocab_size"], length, seed=2)
    ref = reference_output(ref_model, ids)
    out = run_fluxjax(path, ids)
    err = np.abs(out - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), f"max abs error {err:.3g}, max |ref| {np.abs(ref).max():.3g}"


def test_bf16_error_no_larger_than_pytorch_bf16(saved_a):
    """Both bf16 runs against the fp32 reference, all weights bf16 (what from_pretrained gives).

    16 sequences, so the maximum is taken over ~6000 values: over a few hundred, the largest
    of two equally good error samples differs by up to 2x from one seed to the next.
    """
    path, ref_model = saved_a
    ids = random_ids(CONFIG_A["vocab_size"], LENGTH_A, seed=3, batch=16)
    ref = reference_output(ref_model, ids)
    torch_bf16 = transformers.T5EncoderModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert torch_bf16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    torch_err = np.abs(reference_output(torch_bf16, ids) - ref)
    ours_err = np.abs(run_fluxjax(path, ids, "bfloat16") - ref)
    assert ours_err.max() <= 1.5 * torch_err.max(), (ours_err.max(), torch_err.max())
    rms = lambda e: np.sqrt(np.mean(np.square(e)))  # noqa: E731
    assert rms(ours_err) <= 1.5 * rms(torch_err), (rms(ours_err), rms(torch_err))


def test_bf16_needs_no_fp16_clamp(saved_a, tmp_path):
    """Residual activations far beyond float16's range (65504) stay finite and accurate in bf16:
    the clamp transformers applies to float16 has nothing to do in bf16."""
    path, _ = saved_a
    tensors = load_file(str(path / "model.safetensors"))
    for i in range(CONFIG_A["num_layers"]):
        tensors[f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight"] *= 1e5
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ids = random_ids(CONFIG_A["vocab_size"], LENGTH_A, seed=4)

    model, params = load_t5(tmp_path)
    assert _residual_max(model, params, ids) > 4 * 65504  # well past float16's max

    ref = run_fluxjax(tmp_path, ids)
    out = run_fluxjax(tmp_path, ids, "bfloat16")
    assert np.isfinite(out).all()
    # bf16 keeps its relative precision at any magnitude; the output (after the final norm) is O(1).
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def _residual_max(model: T5Encoder, params, ids) -> float:
    """max |residual stream| where it enters the final norm."""
    seen = []

    def grab(next_fun, args, kwargs, context):
        if context.module.name == "final_layer_norm" and context.method_name == "__call__":
            seen.append(jnp.abs(args[0]).max())
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply({"params": params}, jnp.asarray(ids))
    return float(seen[0])


# --- buckets --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 20), (8, 16), (40, 300), (6, 10)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 700
    ours = relative_position_buckets(length, num_buckets, max_distance)
    pos = torch.arange(length)
    theirs = T5Attention._relative_position_bucket(
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    np.testing.assert_array_equal(ours, theirs)


# --- strict loading -------------------------------------------------------------------------


def _copy_with(src, dst, edit) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")


def test_missing_key_is_an_error(saved_a, tmp_path):
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    _copy_with(saved_a[0], tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path)
    assert str(tmp_path) in str(e.value) and key in str(e.value)


def test_extra_key_is_an_error(saved_a, tmp_path):
    key = "encoder.block.0.layer.0.SelfAttention.extra.weight"
    _copy_with(saved_a[0], tmp_path, lambda t: t.__setitem__(key, np.zeros((2, 2), np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path)
    assert str(tmp_path) in str(e.value) and key in str(e.value)


def test_wrong_shape_is_an_error(saved_b, tmp_path):
    """In a sharded folder the error names the shard that holds the key."""
    src = saved_b[0]
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    for f in os.listdir(src):
        shutil.copy(src / f, tmp_path / f)
    tensors = load_file(str(src / shard))
    tensors[key] = np.ascontiguousarray(tensors[key].T)
    save_file(tensors, str(tmp_path / shard))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path)
    assert str(tmp_path / shard) in str(e.value) and key in str(e.value)


def test_tied_embedding_both_identical_or_alias_only(saved_a, tmp_path):
    _, params = load_t5(saved_a[0])
    both, alias_only = tmp_path / "both", tmp_path / "alias"
    both.mkdir(), alias_only.mkdir()
    _copy_with(saved_a[0], both, lambda t: t.__setitem__(EMBED_ALIAS, t[EMBED_KEY].copy()))
    _copy_with(saved_a[0], alias_only, lambda t: t.__setitem__(EMBED_ALIAS, t.pop(EMBED_KEY)))
    for path in (both, alias_only):
        _, loaded = load_t5(path)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_tied_embedding_that_differs_is_an_error(saved_a, tmp_path):
    def edit(t):
        t[EMBED_ALIAS] = t[EMBED_KEY].copy()
        t[EMBED_ALIAS][3, 5] += 1.0

    _copy_with(saved_a[0], tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path)
    assert str(tmp_path) in str(e.value) and EMBED_ALIAS in str(e.value)


# --- full size, no weights ------------------------------------------------------------------


def test_xxl_parameter_count_and_key_table_match_transformers():
    cfg = T5Config.preset("xxl")
    hf = hf_config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
    )
    assert T5Config.from_hf_config(hf.to_dict()) == cfg
    with torch.device("meta"):
        meta = transformers.T5EncoderModel(hf)
    state = {k: tuple(v.shape) for k, v in meta.state_dict().items()}

    shapes = t5_param_shapes(T5Encoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    flat = traverse_util.flatten_dict(flax_meta.unbox(shapes), sep="/")
    ours = sum(int(np.prod(s.shape)) for s in flat.values())
    theirs = sum(p.numel() for p in meta.parameters())  # the tied embedding counted once
    assert ours == theirs == 4_762_310_656

    rules = t5_rules(cfg)
    keys = table_keys(rules)
    assert len(keys) == len(set(keys))
    # The alias is the same tensor as EMBED_KEY (tied), read by the table's one embedding rule.
    assert meta.shared.weight is meta.encoder.embed_tokens.weight
    assert set(keys) == set(state) - {EMBED_ALIAS}
    for rule in rules:
        leaf = flat[rule.target].shape
        want = tuple(TRANSFORMS[rule.transform][1](leaf[1:] if rule.layers else leaf))
        for key in rule.all_keys():
            assert state[key] == want, (key, state[key], want)
