"""Model configurations: frozen dataclasses with named presets, also read from hub config.json.

Field names follow the BFL reference (docs/architecture.md, "Sizes"); `from_hf_config` maps the
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


@dataclasses.dataclass(frozen=True)
class FluxConfig(_Preset):
    """The FLUX.1 flow transformer (BFL `FluxParams`)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

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
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "depth", "depth_single_blocks"):
            if getattr(self, name) < (0 if name.startswith("depth") else 1):
                raise ConfigError(f"FluxConfig: {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @staticmethod
    def presets() -> dict[str, "FluxConfig"]:
        return {
            "dev": FluxConfig(guidance_embed=True),
            "schnell": FluxConfig(guidance_embed=False),
            # Small enough to run on a CPU in a test; the same structure as dev.
            "tiny": FluxConfig(
                vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                depth_single_blocks=2, axes_dim=(8, 12, 12), guidance_embed=True,
            ),
        }

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "FluxConfig":
        """From a diffusers `FluxTransformer2DModel` config.json (path, folder or dict)."""
        cfg = _read_json(source)
        where = "transformer config" if isinstance(source, Mapping) else os.fspath(source)
        if cfg.get("patch_size", 1) != 1:
            raise ConfigError(f"{where}: patch_size {cfg['patch_size']} is not supported (FLUX uses 1)")
        heads = _require(cfg, "num_attention_heads", where)
        in_channels = _require(cfg, "in_channels", where)
        return cls(
            in_channels=in_channels,
            out_channels=cfg.get("out_channels") or in_channels,
            vec_in_dim=_require(cfg, "pooled_projection_dim", where),
            context_in_dim=_require(cfg, "joint_attention_dim", where),
            hidden_size=heads * _require(cfg, "attention_head_dim", where),
            num_heads=heads,
            depth=_require(cfg, "num_layers", where),
            depth_single_blocks=_require(cfg, "num_single_layers", where),
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
    # The legacy id 2 makes transformers pool at argmax(input_ids) (docs/architecture.md, "Text encoders").
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
