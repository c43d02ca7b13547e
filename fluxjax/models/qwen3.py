"""The Qwen3 text encoder of FLUX.2 [klein], as transformers' `Qwen3Model` computes it, and with
`qk_norm=False` the Mistral decoder of FLUX.2 [dev]'s text encoder (transformers' `MistralModel`,
the language model of Mistral-Small-3.1's `Mistral3ForConditionalGeneration`): the two differ only
in Qwen3's per-head RMSNorm of q and k before RoPE.

klein conditions on the hidden states of three layers of Qwen3 (4B for klein-4B, 8B for klein-9B)
run over the chat-templated prompt (fluxjax/models/qwen3_tokenizer.py), stacked side by side:
`prompt_embeds` (B, L, 3 * hidden), as diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds.
FLUX.2 [dev] does the same with Mistral's layers (10, 20, 30) (3 x 5120 = 15360) over its
system + user chat (fluxjax/pipeline/mistral_tokenizer.py), as Flux2Pipeline._get_mistral_3_small_prompt_embeds.

Each decoder layer (pre-norm residual):
  x = x + o_proj(attn(rope(q_norm(q_proj(n1))), rope(k_norm(k_proj(n1))), v_proj(n1)))  n1 = input_layernorm(x)
  x = x + down_proj(silu(gate_proj(n2)) * up_proj(n2))                                n2 = post_attention_layernorm(x)
with grouped-query attention (num_key_value_heads k/v heads shared by the query heads), causal
and masked by the tokenizer's attention mask, and RoPE over the head dim in halves (rotate_half).

Parameter tree (names are the checkpoint's, so fluxjax/loading/qwen3.py is nearly the identity;
the decoder layers stacked by nn.scan under `layers`, leading axis (layers,)):

  embed_tokens/embedding                       (vocab, hidden)                ("vocab", "embed")
  layers/input_layernorm/scale                 (layers, hidden)               ("layers", "norm")
  layers/self_attn/q_proj/kernel               (layers, hidden, H*head_dim)   ("layers", "embed", "heads")
  layers/self_attn/{k,v}_proj/kernel           (layers, hidden, Hkv*head_dim) ("layers", "embed", "heads")
  layers/self_attn/o_proj/kernel               (layers, H*head_dim, hidden)   ("layers", "heads", "embed")
  layers/self_attn/{q,k}_norm/scale            (layers, head_dim)             ("layers", "head_dim")  (qk_norm only)
  layers/post_attention_layernorm/scale        (layers, hidden)               ("layers", "norm")
  layers/mlp/{gate,up}_proj/kernel             (layers, hidden, intermediate) ("layers", "embed", "mlp")
  layers/mlp/down_proj/kernel                  (layers, intermediate, hidden) ("layers", "mlp", "embed")
  norm/scale                                   (hidden,)                      ("norm",)
(plus `bias` on q/k/v/o_proj, axis "heads" or "embed", when the config has attention_bias.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.config import ConfigError, _Preset, _read_json, _require
from fluxjax.errors import UsageError
from fluxjax.models.layers import RMSNorm, constrain, dense, embedding, scan_layers, with_precision

Dtype = Any

KLEIN_LAYERS = (9, 18, 27)  # the hidden states klein stacks (diffusers' text_encoder_out_layers)
FLUX2_DEV_LAYERS = (10, 20, 30)  # the Mistral hidden states FLUX.2 [dev] stacks (Flux2Pipeline's default)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(_Preset):
    """Qwen3 (transformers' `Qwen3Config`, the fields the encoder uses). Defaults: Qwen3-4B, klein-4B's.
    With qk_norm=False, Mistral (transformers' `MistralConfig`, or the text_config of a `Mistral3Config`).

    The presets give the sizes (for planning and random weights); a checkpoint's own config.json
    (`from_hf_config`) is what loading uses, rope_theta included (Qwen3 releases differ in it).
    """

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False
    qk_norm: bool = True  # Qwen3's per-head q_norm/k_norm; Mistral has none

    @property
    def family(self) -> str:
        """"Qwen3" or "Mistral", for messages."""
        return "Qwen3" if self.qk_norm else "Mistral"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"Qwen3Config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"Qwen3Config: head_dim {self.head_dim} must be even (RoPE rotates pairs)")

    @staticmethod
    def presets() -> dict[str, "Qwen3Config"]:
        return {
            "klein-4b": Qwen3Config(),  # Qwen3-4B
            "klein-9b": Qwen3Config(hidden_size=4096, intermediate_size=12288),  # Qwen3-8B
            "tiny": Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16),
            # Mistral-Small-3.1-24B's language model (FLUX.2 [dev]'s text_encoder text_config):
            # head_dim 128 set explicitly (32 heads x 128 = 4096, not hidden 5120)
            "flux2-dev": Qwen3Config(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                     rope_theta=1_000_000_000.0, qk_norm=False),
            "mistral-tiny": Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                        qk_norm=False),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "Qwen3Config":
        """From a transformers config.json (path, folder or dict) by its model_type: "qwen3" (or none:
        `Qwen3ForCausalLM`, the hub's klein text_encoder/, or `Qwen3Model`), "mistral"
        (`MistralModel`, `MistralForCausalLM`: qk_norm=False) or "mistral3"
        (`Mistral3ForConditionalGeneration`, FLUX.2 [dev]'s text_encoder/: its text_config, a
        Mistral; the vision settings are not read, the encoder takes text only). RoPE theta from
        `rope_parameters` (transformers 5) or `rope_theta` (older files)."""
        cfg = _read_json(source)
        where = "Qwen3 config" if isinstance(source, Mapping) else os.fspath(source)
        kind = cfg.get("model_type", "qwen3")
        if kind == "mistral3":
            cfg = _require(cfg, "text_config", where)
            where = f"{where} text_config"
            kind = cfg.get("model_type", "mistral")
            if kind != "mistral":
                raise ConfigError(f"{where}: model_type {kind!r} is not 'mistral' (FLUX.2 [dev]'s language model)")
        if kind not in ("qwen3", "mistral"):
            raise ConfigError(f"{where}: model_type {kind!r} is not 'qwen3', 'mistral' or 'mistral3'")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {cfg['hidden_act']!r} is not {kind}'s 'silu'")
        if kind == "qwen3" and cfg.get("use_sliding_window", False):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported "
                              "(klein's Qwen3 attends to every earlier token)")
        # Qwen3 configs carry a sliding_window size that use_sliding_window switches off; in
        # Mistral's any size switches it on (Mistral-Small-3.1's is null: every earlier token).
        if kind == "mistral" and cfg.get("sliding_window") is not None:
            raise ConfigError(f"{where}: sliding_window={cfg['sliding_window']} is not supported "
                              "(only null: FLUX.2 [dev]'s Mistral attends to every earlier token)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                              "(only 'default')")
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{where}: missing key 'rope_theta' (or rope_parameters.rope_theta)")
        hidden = _require(cfg, "hidden_size", where)
        heads = _require(cfg, "num_attention_heads", where)
        return cls(
            vocab_size=_require(cfg, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_require(cfg, "intermediate_size", where),
            num_hidden_layers=_require(cfg, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=kind == "qwen3",
        )


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (length, head_dim) float32 of positions 0..length-1, as transformers builds them.

    transformers computes the inverse frequencies and the angles in float32 (not float64, unlike
    FLUX's RoPE, layers.rope), so they are made here the same way, on the host (the length is
    static under jit): inv_freq = 1 / theta^(2k/head_dim), angle = position * inv_freq, both
    float32; each table holds the head_dim/2 angles twice, for the two halves `apply_rope` rotates.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, in float32: dimension k pairs with k + head_dim/2.

    x: (B, L, H, head_dim); cos, sin: (L, head_dim) float32. Returns x's shape and dtype.
    """
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, L) tokenizer mask (1 = token, 0 = padding) -> (B, 1, L, L) bool: query q may attend to
    key k where k <= q and k is a token, as transformers' create_causal_mask."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


class Qwen3Attention(nn.Module):
    """Grouped-query self-attention with RoPE, and per-head q/k RMSNorm before it when cfg.qk_norm.

    x: (B, L, hidden) in `dtype`; cos, sin: (L, head_dim) float32; mask: (B, 1, L, L) bool.
    Returns (B, L, hidden) in `dtype`. Logits and softmax in float32.
    """

    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, l, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.attention_bias)

        def heads(name, n, norm=None, rope=False):
            y = dense(n * cfg.head_dim, axes=("embed", "heads"), name=name, **kw)(x).reshape(b, l, n, cfg.head_dim)
            if norm is not None and cfg.qk_norm:
                y = RMSNorm(cfg.rms_norm_eps, self.param_dtype, "head_dim", name=norm)(y)
            if rope:
                y = apply_rope(y, cos, sin)
            return nn.with_logical_constraint(y, ("activation_batch", "activation_length", "activation_heads", None))

        q = heads("q_proj", cfg.num_attention_heads, "q_norm", rope=True)
        k = heads("k_proj", cfg.num_key_value_heads, "k_norm", rope=True)
        v = heads("v_proj", cfg.num_key_value_heads)
        # fluxjax's dot_product_attention takes one bias for the whole batch; the padding mask is
        # per prompt, so this is JAX's attention with a (B, 1, L, L) mask. Its XLA form takes the
        # k/v head groups as they are, with float32 logits and softmax, like the reference.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.head_dim ** -0.5, implementation="xla")
        # A query with no key to attend to (a pad before the first token, under left padding)
        # gets zeros, as PyTorch's sdpa gives them and so diffusers' encoding (transformers'
        # default attention); its eager attention spreads such a row evenly over every key.
        # Right padding, the tokenizer's default, leaves no such row.
        out = jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0)
        out = out.reshape(b, l, cfg.num_attention_heads * cfg.head_dim)
        return dense(cfg.hidden_size, axes=("heads", "embed"), name="o_proj", **kw)(out)


class Qwen3MLP(nn.Module):
    """down_proj(silu(gate_proj x) * up_proj x): (B, L, hidden) -> (B, L, hidden) in `dtype`."""

    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        gate = dense(cfg.intermediate_size, axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, axes=("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(cfg.hidden_size, axes=("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    """One decoder layer in nn.scan's (carry, output) form, keeping the hidden states asked for.

    carry: (x (B, L, hidden) in `dtype`; kept (K, B, L, hidden), slot j holding hidden state
    `keep[j]` once the layer that makes it has run; index: this layer's number, int32).
    cos, sin, mask: as Qwen3Attention's, the same for every layer (broadcast by the scan).
    Returns (carry, None). Layer i makes hidden state i + 1.
    """

    config: Qwen3Config
    keep: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, cos, sin, mask):
        x, kept, index = carry
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, "norm", name="input_layernorm")(x)
        x = constrain(x + Qwen3Attention(cfg, name="self_attn", **kw)(h, cos, sin, mask))
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, "norm", name="post_attention_layernorm")(x)
        x = constrain(x + Qwen3MLP(cfg, name="mlp", **kw)(h))
        # A select per kept slot (elementwise, small beside the layer's matmuls) instead of
        # scanning out every layer's output: only K hidden states are ever held.
        if self.keep:
            kept = jnp.stack([jnp.where(index + 1 == n, x, kept[j]) for j, n in enumerate(self.keep)])
        return (x, kept, index + 1), None


class Qwen3Encoder(nn.Module):
    """Qwen3Model's hidden states: input_ids (B, L) int, attention_mask (B, L) (1 = token,
    0 = padding; None: all tokens) -> (K, B, L, hidden) in `dtype`, the hidden states `layers`
    (K indices) in transformers' output_hidden_states numbering: 0 the token embeddings, i in
    1..num_hidden_layers - 1 the output of layer i (counting from 1), num_hidden_layers the last
    layer's output after the final `norm` (transformers' last_hidden_state).

    Positions are 0..L-1 whatever the padding (as transformers without position_ids); a pad
    before the first token (left padding) has nothing to attend to and gets zeros from
    attention, as in PyTorch's sdpa (see Qwen3Attention). Every layer runs, also those after
    the last one asked for (klein's 27 of 36: about a quarter of the encoder's work unused).
    dtype: activations and matmuls; param_dtype: stored parameters. Norm statistics, RoPE,
    attention logits and softmax are float32 whatever `dtype` is.
    """

    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str | None = None  # matmul precision; None: from dtype (layers.matmul_precision)

    @with_precision
    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 layers: Sequence[int] = KLEIN_LAYERS) -> jax.Array:
        cfg = self.config
        layers = check_layers(layers, cfg.num_hidden_layers, cfg.family)
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embedding(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), stddev=0.02, name="embed_tokens",
                      **kw)(input_ids)
        x = constrain(x)
        cos, sin = (jnp.asarray(t) for t in rope_tables(length, cfg.head_dim, cfg.rope_theta))
        mask = causal_padding_mask(attention_mask)

        inner = tuple(n for n in layers if 0 < n < cfg.num_hidden_layers)  # made inside the scan
        kept = jnp.zeros((len(inner),) + x.shape, x.dtype)
        blocks = scan_layers(Qwen3DecoderLayer, cfg.num_hidden_layers, 3)
        (last, kept, _), _ = blocks(cfg, keep=inner, name="layers", **kw)((x, kept, jnp.int32(0)), cos, sin, mask)
        final = RMSNorm(cfg.rms_norm_eps, self.param_dtype, "norm", name="norm")(last)

        by_index = {0: x, cfg.num_hidden_layers: final, **{n: kept[j] for j, n in enumerate(inner)}}
        return jnp.stack([by_index[n] for n in layers])


def check_layers(layers: Sequence[int], num_hidden_layers: int, family: str = "Qwen3") -> tuple[int, ...]:
    """`layers` as a tuple of ints in 0..num_hidden_layers; UsageError naming the bad one."""
    if isinstance(layers, (int, np.integer)) or not len(layers):
        raise UsageError(f"layers must be a non-empty sequence of hidden-state indices, got {layers!r}")
    out = []
    for n in layers:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= num_hidden_layers:
            raise UsageError(f"layers: {n!r} is not a hidden-state index of this {family} "
                             f"(0..{num_hidden_layers}: 0 the embeddings, i the output of layer i)")
        out.append(int(n))
    return tuple(out)


def stack_hidden_states(hidden: jax.Array) -> jax.Array:
    """(K, B, L, hidden) -> (B, L, K * hidden): per token, the K hidden states side by side
    (diffusers' stack on dim 1, permute(0, 2, 1, 3), reshape)."""
    k, b, l, d = hidden.shape
    return jnp.transpose(hidden, (1, 2, 0, 3)).reshape(b, l, k * d)


def text_ids(batch: int, length: int) -> np.ndarray:
    """FLUX.2's text position ids (B, L, 4) int32: (t, h, w, l) = (0, 0, 0, token index), as
    diffusers' Flux2KleinPipeline._prepare_text_ids without t_coord."""
    ids = np.zeros((batch, length, 4), np.int32)
    ids[..., 3] = np.arange(length, dtype=np.int32)
    return ids


def encode_prompts(model: Qwen3Encoder, params, input_ids, attention_mask, layers: Sequence[int] = KLEIN_LAYERS,
                   dtype=None) -> jax.Array:
    """Token ids and mask (B, L) from qwen3_tokenizer.tokenize -> klein's prompt_embeds
    (B, L, K * hidden), in the encoder's compute dtype or `dtype` when given.

    Pure and jit-friendly with `model`, `layers` (a tuple) and `dtype` static; under a sharding
    strategy jit it with fluxjax.parallel.strategies.jit_with_rules (as pipeline.text.encode_prompts_jit), so that
    each strategy's constraints get their own executable.
    """
    out = stack_hidden_states(model.apply({"params": params}, input_ids, attention_mask, tuple(layers)))
    return out if dtype is None else out.astype(dtype)



def param_shapes(model: Qwen3Encoder) -> dict:
    """The parameter tree of `model` as jax.ShapeDtypeStruct, boxed with logical axis names (no
    weights made): `jax.eval_shape` of `init` on one token."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(functools.partial(model.init, layers=(0,)), jax.random.key(0), ids)["params"]
