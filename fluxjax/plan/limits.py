"""The largest image a model can make on the devices at hand, known before anything is loaded.

One denoising step holds the activations `fluxjax.plan.planner.step_activations` gives (the planner's
analytic figure: the peak of a single-stream block, with XLA attention's (B, H, L, L) logits),
which grow with the square of the image's token count. An image whose step alone needs more than
a device's memory cannot be made there, whatever else fits: `check_image_size` refuses it in one
line naming the limit, before minutes of loading end in an out-of-memory error (or, for dev at
very large sizes, an overflow in the timestep schedule). Sizes under the limit can still fail
for the weights and the VAE's activations: this is a bound, not a plan (`fluxjax plan` gives that).
"""

from __future__ import annotations

import math
import os

from fluxjax.errors import UsageError

GIB = 1 << 30
PIXELS_PER_TOKEN = 16 * 16  # one packed latent token: a 16 x 16 pixel patch


def device_memory(device) -> tuple[int, str]:
    """(bytes, description) of one device's memory: the accelerator's own limit, or the host's
    RAM for a CPU device (which has no limit of its own)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} {device.id}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's RAM"


def transformer_config(model: str, transformer_file: str | None = None):
    """The FluxConfig a pipeline from `model` will run, read from its small JSON files only:
    "tiny"'s preset; a converted folder's transformer/fluxjax.json; a hub folder's
    transformer/config.json; else (a BFL file given, or a hub repo id) FLUX.1's own size."""
    from fluxjax.loading.checkpoint import is_component
    from fluxjax.config import FluxConfig
    from fluxjax.loading.registry import marker_config

    if model == "tiny":
        return FluxConfig.preset("tiny")
    folder = os.path.join(model, "transformer")
    if transformer_file is None and os.path.isdir(folder):
        if is_component(folder):
            return marker_config("transformer", folder)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return FluxConfig.from_hf_config(folder)
    return FluxConfig.preset("dev")


class SizeLimit:
    """Per-device step memory of one model on one set of devices, and the sizes that fit.

    cfg: the transformer's FluxConfig; t5_length: its text tokens; batch: images per call;
    dtype: activations' dtype; strategy: a fluxjax.parallel.strategies.Strategy or None (one device);
    devices: the devices the pipeline will span (their count sets the mesh).
    """

    def __init__(self, cfg, t5_length: int, batch: int, dtype, strategy, devices):
        import jax.numpy as jnp

        from fluxjax.parallel.strategies import BATCH_AXIS

        self.cfg, self.t5_length, self.act_bytes = cfg, t5_length, jnp.dtype(dtype).itemsize
        self.batch, self.heads_split = batch, 1
        if strategy is not None:
            mesh = strategy.mesh_shape(len(devices))
            data = math.prod(mesh[a] for a in strategy.mesh_axes(BATCH_AXIS))
            self.batch = -(-batch // data)  # images per device, the batch padded to the data axes
            self.heads_split = math.prod(mesh[a] for a in strategy.mesh_axes("activation_heads"))
        self.memory, self.where = device_memory(devices[0])

    def step_bytes(self, tokens: int) -> int:
        """The planner's analytic activation bytes of one step on `tokens` image tokens, per device."""
        from fluxjax.plan.planner import step_activations

        return step_activations(self.cfg, self.batch, tokens, self.t5_length, self.heads_split, self.act_bytes)

    def largest_tokens(self) -> int:
        """The most image tokens whose step fits the device's memory (0 if none does)."""
        low, high = 0, 1
        while self.step_bytes(high) <= self.memory:
            low, high = high, high * 2
        while high - low > 1:  # step_bytes grows with tokens: bisect
            mid = (low + high) // 2
            low, high = (mid, high) if self.step_bytes(mid) <= self.memory else (low, mid)
        return low

    def check(self, name: str, height: int, width: int, references=()) -> None:
        """UsageError naming `name` when a height x width image's step needs more than the memory.

        references: the (height, width) of each Kontext reference as it is resized
        (conditioning.kontext_reference_sizes): their tokens join the image's in every step's
        sequence, and attention grows with the square of the whole.
        """
        reference_tokens = sum((h // 16) * (w // 16) for h, w in references)
        tokens = (height // 16) * (width // 16) + reference_tokens
        need = self.step_bytes(tokens)
        if need <= self.memory:
            return
        most = self.largest_tokens()
        side = math.isqrt(most) * 16
        if references:
            asked = f"{name} {width}x{height} with {len(references)} reference image(s) ({reference_tokens:,} tokens)"
            largest = (f"the most this model can take here is {most:,} tokens of image and references (a reference "
                       "is resized to about 1024x1024 pixels, 4,096 tokens): give fewer references or a smaller size")
        else:
            asked = f"{name} {width}x{height}"
            largest = (f"the largest image this model can make here has {most * PIXELS_PER_TOKEN:,} pixels "
                       f"(e.g. {side}x{side})")
        raise UsageError(
            f"{asked}: one denoising step needs {need / GIB:,.1f} GiB per device for its activations "
            f"(fluxjax plan's analytic figure, {self.batch} image(s) per device), more than the {self.memory / GIB:.1f} "
            f"GiB of {self.where}; {largest}")


def fits_here(model: str, height: int = 1024, width: int = 1024, dtype: str = "bfloat16",
              device=None) -> tuple[bool, str]:
    """Whether `model`'s whole pipeline ("dev", "schnell") fits one `device` (default: this
    process's first), from the plan: every component's exact parameter bytes plus one denoising
    step's analytic activations with the attention "auto" picks there; and one line saying so.
    The device's memory is its own limit (an accelerator), or this host's RAM for a CPU."""
    import jax
    import jax.numpy as jnp

    from fluxjax.models.attention import resolve_attention
    from fluxjax.models.target import device_facts
    from fluxjax.plan.planner import PATCH, make_plan, transformer_config
    from fluxjax.parallel.strategies import Strategy

    device = jax.devices()[0] if device is None else device
    dt = jnp.dtype(dtype)
    cfg = transformer_config(model)
    attention = resolve_attention(**device_facts(device), dtype=dt, head_dim=cfg.hidden_size // cfg.num_heads,
                                  seq_len=(height // PATCH) * (width // PATCH), masked=False, cpu_kernel=False)
    plan = make_plan(model, Strategy.load("fsdp"), 1, height, width, 1, dt.name, xla=False, attention=attention,
                     device_kind=device.device_kind)
    memory, where = device_memory(device)
    fits = plan.total_bytes <= memory
    line = (f"{model} in {dt.name} at {width}x{height} needs {plan.total_bytes / GIB:.1f} GiB on one device "
            f"(every component's weights {plan.param_bytes / GIB:.1f} GiB + one step {plan.activation_bytes / GIB:.1f} "
            f"GiB, fluxjax.plan.planner.make_plan); {where} has {memory / GIB:.1f} GiB: {'it fits' if fits else 'it does not fit'}")
    return fits, line
