"""fluxjax: FLUX.1 in JAX/Flax."""

from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config

__all__ = ["FluxConfig", "AutoEncoderConfig", "T5Config", "CLIPConfig"]
