"""fluxjax: FLUX.1 in JAX/Flax.

Loaders return `(model, params)`: a linen module and its parameters read straight from a
PyTorch checkpoint (diffusers/transformers folders or BFL single files), strictly checked, or
restored from the Orbax folders `fluxjax convert` writes; `sharding=` places every leaf
straight into its sharding.
"""

import importlib

from fluxjax.loading.safetensors_io import CheckpointError
from fluxjax.config import AutoEncoderConfig, CLIPConfig, ConfigError, FluxConfig, T5Config

# The loaders live in convert/, which imports fluxjax's models, and the pipeline imports them all:
# resolved on first use, so that importing either package first works and `import fluxjax` is light.
_LAZY = {
    "load_transformer": "fluxjax.loading.flux",
    "load_t5": "fluxjax.loading.t5",
    "load_clip": "fluxjax.loading.clip",
    "load_vae": "fluxjax.loading.vae",
    "FluxPipeline": "fluxjax.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fluxjax' has no attribute {name!r}")


__all__ = [
    "FluxConfig", "AutoEncoderConfig", "T5Config", "CLIPConfig", "ConfigError", "CheckpointError",
    *_LAZY,
]
