"""Model configurations: frozen dataclasses with named presets, also read from hub config.json.

Field names follow the BFL reference (docs/model-reference.md, "Sizes"); `from_hf_config` maps the
diffusers / transformers names onto them. Every config checks its own consistency on creation,
so a bad value fails where it is written, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from fluxjax.errors import check_regular_file


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


def _read_json(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping from a dict, a config.json path, or a folder holding config.json."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.exists(path):  # (a missing one is named below) a FIFO would block the open forever
        check_regular_file(path, error=ConfigError)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{where}: missing key {key!r}")
    return cfg[key]


class _Preset:
    """Mixin: `Cls.preset(name)` looks a name up in the class's PRESETS table."""

    @classmethod
    def preset(cls, name: str):
        presets = cls.presets()
        if name not in presets:
            raise ConfigError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(presets)}")
        return presets[name]

    def replace(self, **changes):
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


MLP_KINDS = ("gelu", "swiglu")

# FLUX.2 (diffusers Flux2Transformer2DModel, BFL flux2 `Flux2`) is the FLUX.1 transformer with these
# settings; only the sizes differ between [klein] 4B, 9B and [dev]. From diffusers'
# Flux2Transformer2DModel.__init__ and BFL's flux2 `Flux2Params` (src/flux2/model.py).
FLUX2_SETTINGS = dict(
    in_channels=128, out_channels=128, vec_in_dim=0, mlp_ratio=3.0, axes_dim=(32, 32, 32, 32), theta=2000,
    qkv_bias=False, bias=False, mlp="swiglu", shared_modulation=True,
)
FLUX2_CLASS = "Flux2Transformer2DModel"  # config.json's _class_name of a diffusers FLUX.2 transformer


@dataclasses.dataclass(frozen=True)
class FluxConfig(_Preset):
    """The FLUX.1 flow transformer (BFL `FluxParams`), and FLUX.2 through the settings below
    (FLUX2_SETTINGS; docs in each field). FLUX.1 configs leave them at their defaults."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768  # the pooled text vector (CLIP); 0: none, vec is the time (+ guidance) embedding (FLUX.2)
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position-id column: 3 columns in FLUX.1, 4 in FLUX.2
    theta: int = 10_000
    qkv_bias: bool = True  # the fused q/k/v Linears (double blocks' qkv, single blocks' linear1) have biases
    guidance_embed: bool = True
    bias: bool = True  # every other Linear has a bias (FLUX.2: none at all)
    # "gelu": Linear, GELU(tanh), Linear. "swiglu" (FLUX.2): the first Linear gives gate and value
    # side by side, then silu(gate) * value.
    mlp: str = "gelu"
    # FLUX.2: the adaLN modulation computed once per block kind and shared by its blocks, not per block.
    shared_modulation: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"FluxConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim != sum(self.axes_dim):
            raise ConfigError(
                f"FluxConfig: head dim {self.head_dim} (hidden_size/num_heads) != sum(axes_dim) "
                f"{sum(self.axes_dim)} for axes_dim {list(self.axes_dim)}"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ConfigError(f"FluxConfig: every axes_dim entry must be even, got {list(self.axes_dim)}")
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"FluxConfig: mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "depth", "depth_single_blocks"):
            least = 0 if name in ("vec_in_dim", "depth", "depth_single_blocks") else 1
            if getattr(self, name) < least:
                raise ConfigError(f"FluxConfig: {name} must be at least {least}, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def mlp_up_dim(self) -> int:
        """Output features of the MLP's first Linear: mlp_hidden_dim, twice that for SwiGLU (gate, value)."""
        return self.mlp_hidden_dim * (2 if self.mlp == "swiglu" else 1)

    @property
    def id_columns(self) -> int:
        """Columns of img_ids / txt_ids: one position per RoPE axis (3 in FLUX.1, 4 in FLUX.2)."""
        return len(self.axes_dim)

    @staticmethod
    def presets() -> dict[str, "FluxConfig"]:
        flux2 = lambda **sizes: FluxConfig(**FLUX2_SETTINGS, **sizes)  # noqa: E731
        return {
            "dev": FluxConfig(guidance_embed=True),
            "schnell": FluxConfig(guidance_embed=False),
            # Small enough to run on a CPU in a test; the same structure as dev.
            "tiny": FluxConfig(
                vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                depth_single_blocks=2, axes_dim=(8, 12, 12), guidance_embed=True,
            ),
            # FLUX.2 sizes from diffusers' scripts/convert_flux2_to_diffusers.py,
            # get_flux2_transformer_config (huggingface/diffusers 58eb52c0): "klein-4b", "klein-9b",
            # "flux2-dev"; klein-4B also as published in a FLUX.2-klein-base-4B transformer/config.json.
            # Every one has attention_head_dim 128, mlp_ratio 3.0, axes (32,)*4, theta 2000.
            # context_in_dim (joint_attention_dim) is 3 stacked text-encoder layers: 3 x 2560
            # (Qwen3-4B), 3 x 4096 (Qwen3-8B), 3 x 5120 (Mistral-Small-3.1).
            # klein (distilled and base) has no guidance embedding; [dev] has one (diffusers' default).
            "flux2-klein-4b": flux2(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                                    depth_single_blocks=20, guidance_embed=False),
            "flux2-klein-9b": flux2(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8,
                                    depth_single_blocks=24, guidance_embed=False),
            "flux2-dev": flux2(context_in_dim=15360, hidden_size=6144, num_heads=48, depth=8,
                               depth_single_blocks=48, guidance_embed=True),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "FluxConfig":
        """From a diffusers `FluxTransformer2DModel` or `Flux2Transformer2DModel` config.json (path,
        folder or dict; told apart by `_class_name`)."""
        cfg = _read_json(source)
        where = "transformer config" if isinstance(source, Mapping) else os.fspath(source)
        if cfg.get("patch_size", 1) != 1:
            raise ConfigError(f"{where}: patch_size {cfg['patch_size']} is not supported (FLUX uses 1)")
        heads = _require(cfg, "num_attention_heads", where)
        in_channels = _require(cfg, "in_channels", where)
        sizes = dict(
            in_channels=in_channels,
            out_channels=cfg.get("out_channels") or in_channels,
            context_in_dim=_require(cfg, "joint_attention_dim", where),
            hidden_size=heads * _require(cfg, "attention_head_dim", where),
            num_heads=heads,
            depth=_require(cfg, "num_layers", where),
            depth_single_blocks=_require(cfg, "num_single_layers", where),
        )
        if cfg.get("_class_name") == FLUX2_CLASS:
            # Fixed in fluxjax (as in BFL's flux2): a config that changes them is another model.
            for key, value in (("timestep_guidance_channels", 256), ("eps", 1e-6)):
                if cfg.get(key, value) != value:
                    raise ConfigError(f"{where}: {key} {cfg[key]} is not supported (FLUX.2 uses {value})")
            settings = {k: v for k, v in FLUX2_SETTINGS.items() if k not in sizes}
            return cls(**{
                **settings, **sizes,
                "mlp_ratio": cfg.get("mlp_ratio", settings["mlp_ratio"]),
                "axes_dim": tuple(cfg.get("axes_dims_rope", settings["axes_dim"])),
                "theta": cfg.get("rope_theta", settings["theta"]),
                # diffusers' default, as Flux2Transformer2DModel's __init__ has it
                "guidance_embed": bool(cfg.get("guidance_embeds", True)),
            })
        return cls(
            **sizes,
            vec_in_dim=_require(cfg, "pooled_projection_dim", where),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig(_Preset):
    """The FLUX VAE (BFL `AutoEncoderParams`)."""

    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_num_groups: int = 32
    # FLUX.2 (diffusers AutoencoderKLFlux2): 1x1 `quant_conv` / `post_quant_conv` around the latent, and
    # `bn`, the running mean and variance that normalise 2x2-patchified latents with this eps.
    quant_conv: bool = False
    batch_norm_eps: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_num_groups:
                raise ConfigError(
                    f"AutoEncoderConfig: width {self.ch * m} is not divisible by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @staticmethod
    def presets() -> dict[str, "AutoEncoderConfig"]:
        return {
            "flux": AutoEncoderConfig(),
            "tiny": AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, norm_num_groups=8),
            "flux2": AutoEncoderConfig(z_channels=32, scale_factor=1.0, shift_factor=0.0, quant_conv=True,
                                       batch_norm_eps=1e-4),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "AutoEncoderConfig":
        """From a diffusers `AutoencoderKL` (FLUX.1) or `AutoencoderKLFlux2` config.json (path, folder or dict)."""
        cfg = _read_json(source)
        where = "vae config" if isinstance(source, Mapping) else os.fspath(source)
        widths = list(_require(cfg, "block_out_channels", where))
        ch = widths[0]
        if any(w % ch for w in widths):
            raise ConfigError(f"{where}: block_out_channels {widths} are not multiples of the first")
        if not cfg.get("mid_block_add_attention", True):
            raise ConfigError(f"{where}: mid_block_add_attention=false is not the FLUX VAE")
        if cfg.get("_class_name") == "AutoencoderKLFlux2":
            family = _flux2_vae_fields(cfg, where, widths)
        else:
            for key in ("use_quant_conv", "use_post_quant_conv"):
                if cfg.get(key, True):
                    raise ConfigError(f"{where}: {key}=true is not the FLUX VAE (it has no quant convs)")
            family = dict(scale_factor=_require(cfg, "scaling_factor", where),
                          shift_factor=_require(cfg, "shift_factor", where))
        return cls(
            in_channels=cfg.get("in_channels", 3),
            ch=ch,
            out_ch=cfg.get("out_channels", 3),
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=_require(cfg, "layers_per_block", where),
            z_channels=_require(cfg, "latent_channels", where),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            **family,
        )


def _flux2_vae_fields(cfg: Mapping[str, Any], where: str, widths: list[int]) -> dict[str, Any]:
    """AutoencoderKLFlux2's own settings, with the class's defaults for absent keys. It has no
    scaling or shift factor (the pipeline normalises with `bn` instead): 1.0 and 0.0 leave z as is."""
    quant, post_quant = cfg.get("use_quant_conv", True), cfg.get("use_post_quant_conv", True)
    if quant != post_quant:
        raise ConfigError(f"{where}: use_quant_conv={quant} with use_post_quant_conv={post_quant} is not supported")
    if list(cfg.get("patch_size", (2, 2))) != [2, 2]:
        raise ConfigError(f"{where}: patch_size {cfg['patch_size']} is not supported (FLUX.2 uses [2, 2])")
    decoder = cfg.get("decoder_block_out_channels")
    if decoder is not None and list(decoder) != widths:
        raise ConfigError(f"{where}: decoder_block_out_channels {list(decoder)} differ from block_out_channels "
                          f"{widths}, which is not supported")
    return dict(scale_factor=1.0, shift_factor=0.0, quant_conv=bool(quant),
                batch_norm_eps=float(cfg.get("batch_norm_eps", 1e-4)))


@dataclasses.dataclass(frozen=True)
class T5Config(_Preset):
    """The T5 v1.1 encoder (gated-GELU feed-forward, relative position buckets)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @staticmethod
    def presets() -> dict[str, "T5Config"]:
        return {
            "xxl": T5Config(),
            "tiny": T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "T5Config":
        """From a transformers `T5EncoderModel` config.json (path, folder or dict)."""
        cfg = _read_json(source)
        where = "T5 config" if isinstance(source, Mapping) else os.fspath(source)
        ffn = cfg.get("feed_forward_proj", "relu")
        if ffn != "gated-gelu":
            raise ConfigError(f"{where}: feed_forward_proj {ffn!r} is not T5 v1.1's 'gated-gelu'")
        return cls(
            vocab_size=_require(cfg, "vocab_size", where),
            d_model=_require(cfg, "d_model", where),
            d_kv=_require(cfg, "d_kv", where),
            d_ff=_require(cfg, "d_ff", where),
            num_layers=_require(cfg, "num_layers", where),
            num_heads=_require(cfg, "num_heads", where),
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
        )


@dataclasses.dataclass(frozen=True)
class CLIPConfig(_Preset):
    """The CLIP text transformer (CLIP-L/14 text tower, `CLIPTextModel`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # The legacy id 2 makes transformers pool at argmax(input_ids) (docs/model-reference.md, "Text encoders").
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"CLIPConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIPConfig: hidden_act {self.hidden_act!r} is not supported")

    @staticmethod
    def presets() -> dict[str, "CLIPConfig"]:
        return {
            "large": CLIPConfig(),
            "tiny": CLIPConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "CLIPConfig":
        """From a transformers `CLIPTextModel` config.json (path, folder or dict)."""
        cfg = _read_json(source)
        where = "CLIP config" if isinstance(source, Mapping) else os.fspath(source)
        cfg = cfg.get("text_config", cfg)  # a full CLIPModel config nests the text tower
        return cls(
            vocab_size=_require(cfg, "vocab_size", where),
            hidden_size=_require(cfg, "hidden_size", where),
            intermediate_size=_require(cfg, "intermediate_size", where),
            num_layers=_require(cfg, "num_hidden_layers", where),
            num_heads=_require(cfg, "num_attention_heads", where),
            max_position_embeddings=cfg.get("max_position_embeddings", 77),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            hidden_act=cfg.get("hidden_act", "quick_gelu"),
            eos_token_id=cfg.get("eos_token_id", 2),
        )
