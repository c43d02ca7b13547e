"""The LoRAs a pipeline holds: fused into its transformer's weights, or live in the denoising loop
(fluxjax.lora.adapters) with what unloading them restores and each image's strengths.

`LoraMixin` gives FluxPipeline (and the FLUX.2 pipeline, flux2.Flux2Pipeline) its LoRA verbs
(load_lora, unload_lora) and views (loras, adapters), as diffusers' FluxLoraLoaderMixin does;
the state sits in a `LoraState`, immutable: `load` and `unload` return a new one with the new
transformer, which the pipeline keeps, so a copy of a pipeline (copy.copy) keeps the LoRAs it had.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.lora import adapters as lora, fused
from fluxjax.pipeline import conditioning
from fluxjax.pipeline.components import check_compatible


def lora_pairs(loras) -> list[tuple[str, float]]:
    """[(file, strength)] of `loras`: a file, a (file, strength) pair, or a list of either (strength
    1.0 when omitted); each strength checked before any file is read."""
    items = [loras] if isinstance(loras, (str, os.PathLike)) or (
        isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float))) else list(loras)
    pairs = [(os.fspath(x), 1.0) if isinstance(x, (str, os.PathLike)) else (os.fspath(x[0]), float(x[1])) for x in items]
    for file, strength in pairs:
        lora.check_strengths(strength, f"load_lora {file}")
    return pairs


@dataclass(frozen=True)
class LoraState:
    """The live LoRAs of a pipeline (none in a new one).

    loras: (file, default strength) of each live LoRA, in the order loaded.
    adapters: their fluxjax.lora.adapters.Adapters, the tree on the device; None without live LoRAs.
    base_params: the transformer's params before live LoRAs replaced tensors (control LoRAs'
        QK-norm scales); None without live LoRAs.
    unwidened: the base model's transformer (a pipeline.Component) before a live control LoRA
        widened its img_in; None when none did.
    """

    loras: tuple[tuple[str, float], ...] = ()
    adapters: Any = None
    base_params: Any = None
    unwidened: Any = None

    def load(self, transformer, pairs: list[tuple[str, float]], fuse: bool, widen: bool, mesh,
             on_widen: Callable[[Any], None]) -> tuple["LoraState", Any]:
        """(the new state, the transformer Component) with the LoRAs `pairs` (from lora_pairs) added.

        fuse: fold them into the weights (no live LoRA may be loaded before); else run them live
            next to those loaded before, the adapter tree replicated on `mesh` (None: one device).
        widen: a structural-control LoRA may widen img_in (a base model becomes a control one);
            `on_widen(config)`, given the widened FluxConfig, raises unless such a transformer
            fits the pipeline's other components, and records the new variant.
        """
        t = transformer
        if fuse:
            if self.loras:
                raise UsageError("fuse LoRAs before loading live ones (or call pipe.unload_lora() first)")
            adapters = lora.load_loras([f for f, _ in pairs], t.model.config, t.params, t.model.param_dtype, widen)
            t = _widened(t, adapters, on_widen)
            return self, dataclasses.replace(t, params=fused.fuse(t.params, adapters, [s for _, s in pairs]))
        base = t if self.base_params is None else dataclasses.replace(t, params=self.base_params)
        loras = self.loras + tuple(pairs)
        adapters = lora.load_loras([f for f, _ in loras], t.model.config, base.params, t.model.param_dtype, widen)
        unwidened = base if adapters.input_width is not None else self.unwidened  # restored by unload
        base = _widened(base, adapters, on_widen)
        placement = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        placed = lora.Adapters(jax.device_put(adapters.tree, placement), {}, adapters.names, adapters.formats)
        state = LoraState(loras, placed, base.params, unwidened)
        return state, dataclasses.replace(base, params=lora.with_replacements(base.params, adapters))

    def unload(self, transformer) -> tuple["LoraState", Any]:
        """(no LoRAs, the transformer Component without the live ones): the base model's when a
        control LoRA widened it. Fused LoRAs are part of the weights and stay."""
        if self.base_params is None:
            return LoraState(), transformer
        if self.unwidened is not None:
            return LoraState(), self.unwidened
        return LoraState(), dataclasses.replace(transformer, params=self.base_params)

    def scales(self, lora_scales, batch: int) -> np.ndarray | None:
        """(B, n) float32: the strength of each of the n live LoRAs on each of the `batch` images,
        from `lora_scales` (one number per LoRA, or a (B, n) table) or the strengths they were
        loaded with; None without live LoRAs, where lora_scales is refused (UsageError)."""
        if self.adapters is None:
            if lora_scales is not None:
                raise UsageError("lora_scales given, but no LoRA is loaded live (pipe.load_lora(..., fuse=False))")
            return None
        strengths = [s for _, s in self.loras] if lora_scales is None else lora_scales
        return lora.image_scales(strengths, batch, self.adapters.count)


def _widened(t, adapters, on_widen: Callable[[Any], None]):
    """`t` with img_in as wide as a structural-control LoRA among `adapters` needs (the new inputs
    at zero); `t` itself when none needs it."""
    if adapters.input_width is None:
        return t
    config = dataclasses.replace(t.model.config, in_channels=adapters.input_width)
    on_widen(config)
    return dataclasses.replace(t, model=t.model.clone(config=config), params=lora.widen_input(t.params, adapters.input_width))


class LoraMixin:
    """FluxPipeline's and Flux2Pipeline's LoRA methods. Reads and sets the pipeline's transformer,
    variant and lora_state; reads its mesh, name and other components."""

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The live LoRAs, (file, default strength) in the order loaded (see load_lora)."""
        return list(self.lora_state.loras)

    @property
    def adapters(self):
        """The live LoRAs' fluxjax.lora.adapters.Adapters, on the device; None without live LoRAs."""
        return self.lora_state.adapters

    def load_lora(self, loras, fuse: bool = False) -> None:
        """Apply LoRAs to the transformer (any format of fluxjax.lora.formats).

        loras: a file, a (file, strength) pair, or a list of either (strength 1.0 when omitted).
        fuse: True folds W + strength * alpha/r * B A into the weights (on the device, in each
            weight's sharding; no cost per step, strengths fixed); False runs the LoRAs live in
            the denoising loop next to those loaded live before, their strengths adjustable per
            call and per image with `pipe(..., lora_scales=...)` without recompiling.
        Full replacement tensors (control LoRAs' QK-norm scales) replace the weights either way.
        """
        pairs = lora_pairs(loras)  # every strength checked before any file is read
        self.lora_state, self.transformer = self.lora_state.load(self.transformer, pairs, fuse,
                                                                 self._takes_control_lora(), self.mesh, self._widen_to)

    def unload_lora(self) -> None:
        """Remove the live LoRAs (fused ones are part of the weights: reload the pipeline); a base
        model a live control LoRA widened is a base model again."""
        if self.lora_state.unwidened is not None:
            self.variant = "base"
        self.lora_state, self.transformer = self.lora_state.unload(self.transformer)

    def _takes_control_lora(self) -> bool:
        """Whether a structural-control LoRA may widen img_in: a base model becomes a control one."""
        return self.variant == "base"

    def _widen_to(self, config: FluxConfig) -> None:
        """A control LoRA widens the transformer's img_in to `config`: UsageError unless that fits
        the other components; the pipeline becomes a "control" one."""
        self.variant = conditioning.variant_of(config.in_channels, where=f"{self.name} with a control LoRA")
        check_compatible(config, self.t5.model.config, self.clip.model.config, self.vae.model.config, self.variant)
