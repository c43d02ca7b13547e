"""fluxjax: FLUX.1 in JAX/Flax.

Loaders return `(model, params)`: a linen module and its parameters read straight from a
PyTorch checkpoint (diffusers/transformers folders or BFL single files), strictly checked.
"""

from convert.clip import load_clip
from convert.flux import load_transformer
from convert.safetensors_io import CheckpointError
from convert.t5 import load_t5
from convert.vae import load_vae
from fluxjax.config import AutoEncoderConfig, CLIPConfig, ConfigError, FluxConfig, T5Config

__all__ = [
    "FluxConfig", "AutoEncoderConfig", "T5Config", "CLIPConfig", "ConfigError", "CheckpointError",
    "load_transformer", "load_t5", "load_clip", "load_vae",
]
