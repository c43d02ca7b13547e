"""fluxjax: FLUX.1 in JAX/Flax.

Loaders return `(model, params)`: a linen module and its parameters read straight from a
PyTorch checkpoint (diffusers/transformers folders or BFL single files), strictly checked, or
restored from the Orbax folders `fluxjax convert` writes; `sharding=` places every leaf
straight into its sharding. Packages depend one way (tests/test_imports.py ranks them): models <-
parallel, loading <- lora <- sampling <- pipeline <- training <- plan, batch <- commands.
"""

from fluxjax.runtime import apply_gpu_defaults

apply_gpu_defaults()  # before JAX starts a backend; see fluxjax/runtime.py

from fluxjax.config import AutoEncoderConfig, CLIPConfig, ConfigError, FluxConfig, T5Config
from fluxjax.errors import CheckpointError
from fluxjax.loading.registry import load_clip, load_t5, load_transformer, load_vae
from fluxjax.pipeline.pipeline import FluxPipeline

__all__ = [
    "FluxConfig", "AutoEncoderConfig", "T5Config", "CLIPConfig", "ConfigError", "CheckpointError",
    "load_transformer", "load_t5", "load_clip", "load_vae", "FluxPipeline",
]
