"""Rectified-flow sampling for FLUX (docs/model-reference.md, "Sampling"): noise, 2x2 packing,
position ids, the timestep schedule and the jitted Euler loop.

Flow convention: x_t = (1 - t) x_0 + t eps; the transformer predicts v = eps - x_0, and the loop
integrates from t = 1 (noise) to t = 0 (image): x <- x + (t_prev - t_curr) v.

Sizes: images are H x W pixels, multiples of 16; latents are (B, 16, H/8, W/8) (NCHW, as
`torch.randn` gives them, so noise can be exchanged with other implementations); packed
latents are (B, (H/16)(W/16), 64), token index row-major, feature index c*4 + ph*2 + pw.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.lora import live as lora
from fluxjax.errors import UsageError
from fluxjax.parallel.strategies import jit_with_rules

LATENT_CHANNELS = 16
PATCH = 2  # latents are packed in 2x2 patches
PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch 2


def check_size(height: int, width: int) -> None:
    """Raise UsageError unless height and width are positive multiples of 16.

    fluxjax refuses other sizes instead of rounding them down as BFL does (or up, as diffusers'
    latent shape does): a silently different size would break a batch or a comparison.
    """
    check_dimension("height", height)
    check_dimension("width", width)


def check_dimension(name: str, value: int) -> None:
    """Raise UsageError naming `name` unless `value` is a positive multiple of 16."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < PIXELS_PER_TOKEN:
        raise UsageError(f"{name} must be an integer >= {PIXELS_PER_TOKEN}, got {value!r}")
    if value % PIXELS_PER_TOKEN:
        lower = value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        raise UsageError(f"{name} {value} is not a multiple of {PIXELS_PER_TOKEN}; use {lower} or {lower + PIXELS_PER_TOKEN}")


SEEDS = 1 << 32  # seeds 0 .. 2**32 - 1: jax.random.key keeps a seed's low 32 bits, so larger ones alias smaller


def check_seed(name: str, value: int) -> None:
    """Raise UsageError naming `name` unless `value` is an integer seed in [0, 2**32).

    Outside that range jax.random.key would either overflow or silently give the noise of
    another seed (2**32 draws what 0 draws).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < SEEDS:
        raise UsageError(f"{name} must be an integer from 0 to {SEEDS - 1}, got {value!r}")


def latent_shape(batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(B, 16, H/8, W/8): the shape of the initial noise for an H x W image."""
    check_size(height, width)
    return (batch, LATENT_CHANNELS, height // 8, width // 8)


def noise(seeds, height: int, width: int) -> jax.Array:
    """Initial latents (B, 16, H/8, W/8) float32, one standard normal draw per seed.

    seeds: a sequence of B ints. Image i depends only on seeds[i], so an image comes out the same
    whether it is generated alone or in any batch.
    """
    return seeded_normal(seeds, latent_shape(1, height, width)[1:])


def seeded_normal(seeds, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape) float32: one standard normal draw of `shape` per seed (FLUX.1's noise; FLUX.2's
    (128, H/16, W/16), fluxjax.pipeline.flux2)."""
    keys = jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
    return jax.vmap(lambda k: jax.random.normal(jax.random.wrap_key_data(k), tuple(shape), jnp.float32))(keys)


def pack(latents: jax.Array) -> jax.Array:
    """(B, C, h, w) -> (B, (h/2)(w/2), C*4): 2x2 patches, feature index c*4 + ph*2 + pw."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # b, row, col, c, ph, pw
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B, (H/16)(W/16), C*4) -> (B, C, H/8, W/8), the inverse of `pack` for an H x W image."""
    b, _, f = x.shape
    rows, cols, c = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN, f // (PATCH * PATCH)
    x = x.reshape(b, rows, cols, c, PATCH, PATCH).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * PATCH, cols * PATCH)


def image_ids(batch: int, height: int, width: int) -> np.ndarray:
    """(B, (H/16)(W/16), 3) float32 position ids (index 0, row, col) of the packed image tokens."""
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return np.broadcast_to(ids.reshape(1, rows * cols, 3), (batch, rows * cols, 3))


def text_ids(batch: int, length: int) -> np.ndarray:
    """(B, L_txt, 3) float32 zeros: text tokens carry no position in FLUX's RoPE."""
    return np.zeros((batch, length, 3), np.float32)


def check_sigmas(sigmas, name: str = "sigmas") -> list[float]:
    """A custom schedule (the `sigmas` of diffusers' pipelines: N timesteps, the final 0 left out)
    as Python floats; UsageError naming `name` unless there is at least one, each in (0, 1],
    strictly decreasing."""
    values = np.asarray(sigmas, dtype=object).reshape(-1) if not isinstance(sigmas, (int, float)) else np.array([sigmas], object)
    if len(values) == 0 or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{name} must be a list of numbers, got {sigmas!r}")
    floats = np.asarray(values, np.float64)
    if not (np.isfinite(floats).all() and (floats > 0).all() and (floats <= 1).all() and (np.diff(floats) < 0).all()):
        raise UsageError(f"{name} must decrease strictly within (0, 1] (the final 0 is appended), got {floats.tolist()}")
    return floats.tolist()


# --- schedule ---------------------------------------------------------------------------------

# Options of diffusers' FlowMatchEulerDiscreteScheduler that change the schedule in ways FLUX's
# checkpoints never use; a config that sets one is refused rather than silently ignored.
_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "stochastic_sampling",
)


@dataclass(frozen=True)
class Schedule:
    """How the timesteps are shifted; the fields of the hub's scheduler/scheduler_config.json.

    use_dynamic_shifting: resolution-dependent shift (dev): mu on the line through
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), then
        t <- e^mu / (e^mu + (1/t - 1)) ("exponential") or mu / (mu + (1/t - 1)) ("linear").
    Otherwise the static shift t <- shift t / (1 + (shift - 1) t) (schnell: shift 1, identity).
    """

    use_dynamic_shifting: bool = True
    shift: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise UsageError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")

    @classmethod
    def dev(cls) -> "Schedule":
        """BFL's shifted schedule (every FLUX.1 model except schnell)."""
        return cls(use_dynamic_shifting=True)

    @classmethod
    def schnell(cls) -> "Schedule":
        """No shift: linspace(1, 0, steps + 1)."""
        return cls(use_dynamic_shifting=False, shift=1.0)

    @classmethod
    def from_config(cls, source: str | os.PathLike | Mapping[str, Any]) -> "Schedule":
        """From a FlowMatchEulerDiscreteScheduler config: a dict, a scheduler_config.json, or its folder."""
        if isinstance(source, Mapping):
            cfg, where = dict(source), "scheduler config"
        else:
            where = os.fspath(source)
            if os.path.isdir(where):
                where = os.path.join(where, "scheduler_config.json")
            with open(where) as f:
                cfg = json.load(f)
        cls_name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if cls_name != "FlowMatchEulerDiscreteScheduler":
            raise UsageError(f"{where}: scheduler {cls_name!r} is not supported (FLUX uses FlowMatchEulerDiscreteScheduler)")
        for key in _UNSUPPORTED_SCHEDULER_OPTIONS:
            if cfg.get(key):
                raise UsageError(f"{where}: scheduler option {key}={cfg[key]!r} is not supported by fluxjax")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in cfg.items() if k in names and v is not None}
        return cls(**values)

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for `image_seq_len` packed image tokens (extrapolated past the ends)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        """(num_steps + 1,) float32 timesteps from 1 down to 0 (the final 0 included).

        Computed in float64 and rounded once, so they are the exact values of BFL's formula.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise UsageError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        t = np.linspace(1.0, 0.0, num_steps + 1)
        t[1:-1] = self.shift_timesteps(t[1:-1], image_seq_len)  # t = 1 and t = 0 are fixed points of every shift
        return t.astype(np.float32)

    def shift_sigmas(self, sigmas, image_seq_len: int) -> np.ndarray:
        """(N + 1,) float32: N given timesteps (decreasing, in (0, 1]) shifted, then the final 0.

        As diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...): given sigmas go
        through the same shift as the default linspace (dev: the resolution shift), so
        linspace(1, 1/N, N) gives `self.sigmas(N, ...)`. Computed in float64, rounded once.
        """
        t = np.asarray(sigmas, np.float32).astype(np.float64)  # diffusers takes them as float32
        return np.append(self.shift_timesteps(t, image_seq_len), 0.0).astype(np.float32)

    def shift_timesteps(self, t, image_seq_len: int):
        """The schedule's shift applied to timesteps t in (0, 1] (NumPy or jax arrays, any shape).

        The one shift rule of fluxjax: the sampler's `sigmas` and the training loss's timestep
        draw (fluxjax.training.trainer) both call it, so a model is trained on the times it is sampled at.
        """
        return self._shift(t, self.mu(image_seq_len) if self.use_dynamic_shifting else None)

    def training_timesteps(self, t, image_seq_len: int):
        """The training loss's timesteps from draws t in (0, 1) (fluxjax.training.trainer): for
        FLUX.1 shifted as the sampler shifts (`shift_timesteps`)."""
        return self.shift_timesteps(t, image_seq_len)

    def _shift(self, t, mu: float | None):
        """t shifted by the dynamic shift `mu`, or by the static `shift` when mu is None."""
        if mu is not None:
            a = math.exp(mu) if self.time_shift_type == "exponential" else mu
            return a / (a + (1.0 / t - 1.0))
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's dynamic shift (diffusers' `compute_empirical_mu`, BFL flux2's sampling): linear in
    the number of steps between two fits of image_seq_len, at 10 and at 200 steps; past 4300
    image tokens the 200-step fit alone."""
    a1, b1 = 8.73809524e-05, 1.89833333  # the 10-step fit
    a2, b2 = 0.00016927, 0.45666666  # the 200-step fit
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


@dataclass(frozen=True)
class Flux2Schedule(Schedule):
    """FLUX.2's schedule (diffusers' Flux2KleinPipeline): the scheduler config's fields as
    `Schedule`, but the dynamic shift's mu is `empirical_mu(image_seq_len, num_steps)` (what the
    pipeline passes to set_timesteps), not the line through base/max_shift. Without dynamic
    shifting, the static `shift` as in `Schedule`."""

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        """(num_steps + 1,) float32: linspace(1, 1/N, N) shifted, then the final 0 (as diffusers)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise UsageError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        return self.shift_sigmas(np.linspace(1.0, 1.0 / num_steps, num_steps), image_seq_len)

    def shift_sigmas(self, sigmas, image_seq_len: int) -> np.ndarray:
        """(N + 1,) float32: N given timesteps shifted with mu for N steps, then the final 0."""
        t = np.asarray(sigmas, np.float32).astype(np.float64)  # diffusers takes them as float32
        mu = empirical_mu(image_seq_len, len(t)) if self.use_dynamic_shifting else None
        return np.append(self._shift(t, mu), 0.0).astype(np.float32)

    def shift_timesteps(self, t, image_seq_len: int):
        raise UsageError("FLUX.2's timestep shift depends on the number of sampling steps: use sigmas(num_steps, ...)")

    def training_timesteps(self, t, image_seq_len: int):
        """t itself with dynamic shifting (klein's config), else the static shift: diffusers'
        FLUX.2 LoRA trainers (train_dreambooth_lora_flux2*.py) draw from the scheduler's training
        timesteps, which its constructor shifts only without dynamic shifting; the empirical mu
        depends on a sampling step count a training step does not have."""
        return t if self.use_dynamic_shifting else self._shift(t, None)


# --- the denoising loop -----------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepCallback:
    """The host function a loop calls after each step, as a jit argument: `token` (int32 scalar)
    names it, the function itself stays on the host. Every StepCallback is a pytree of the same
    structure, so a new callback (a new progress bar) reuses the compiled loop. Made by
    `step_callback`, valid within its context."""

    token: Any


# Callbacks of the `step_callback` contexts now open, by token. Read on the host only, when a step
# reports (XLA runs host callbacks on threads of its own); the traced loop carries the token.
_CALLBACKS: dict[int, Callable[[int], None]] = {}
_TOKENS = itertools.count()


def _report_step(token, i) -> None:
    callback = _CALLBACKS.get(int(token))
    if callback is not None:
        callback(int(i))


@contextlib.contextmanager
def step_callback(callback: Callable[[int], None]):
    """A `StepCallback` for `denoise(..., on_step=...)`: within this context `callback(step_index)`
    runs on the host after each step of a loop given it (e.g. to advance a progress bar)."""
    token = next(_TOKENS) % (1 << 31)  # an int32
    _CALLBACKS[token] = callback
    try:
        yield StepCallback(np.int32(token))
    finally:
        del _CALLBACKS[token]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Conditioning:
    """What a conditioned denoising loop takes beyond the prompt; every field optional.

    A pytree: its array fields are jit arguments (a new image, mask, reference or strength of the
    same shapes reuses the executable), a field left None is structure (each combination of
    given fields compiles once). Shapes, B the batch and L_img the packed image tokens:

    start:         int32 scalar: the first step index; the loop runs steps start .. N-1 and its
                   `img` is the latent at sigmas[start] (img2img / inpainting strength).
    image_latents, noise, mask: (B, L_img, 64) float32, base-model inpainting (diffusers'
                   FluxInpaintPipeline): after step i, x <- (1 - mask) x_known + mask x with
                   x_known = sigmas[i+1] noise + (1 - sigmas[i+1]) image_latents (the known
                   region re-noised to the next time; at the last step, the image latents).
    channels:      (B, L_img, C): features concatenated after x along the feature axis at every
                   transformer call (Fill: masked-image latents and packed mask; Control: the
                   control image's latents); the transformer's in_channels is 64 + C.
    ref_img, ref_ids: (B, L_ref, 64), (B, L_ref, n): reference tokens (Kontext; FLUX.2's 128 features
                   and 4 id columns) appended after
                   the image tokens in the sequence at every call, with their position ids; the
                   velocity of the first L_img tokens is kept.
    ref_time:      (B,) float32, with ref_img: cached references, as diffusers' Flux2KleinKVPipeline
                   (ref_fixed_timestep): the reference tokens attend only to themselves and are
                   modulated at this fixed time, while the text and image tokens attend to all.
                   Their keys and values in every block then do not change from step to step, so
                   the loop computes them once, before its first step (one transformer pass over
                   the L_ref tokens alone, `Flux(return_kv=True)`), and every call runs only the
                   L_txt + L_img tokens, which attend to them as well (`Flux(ref_kv=...)`). That
                   saves, at each step, the blocks' linears and MLPs on the L_ref tokens and the
                   references' own queries (attention (L_txt + L_img)(L_txt + L_img + L_ref) in
                   place of (L_txt + L_img + L_ref)^2); it holds 2 x (depth + depth_single_blocks)
                   x B x L_ref x hidden_size keys and values for the whole loop. The negative pass
                   of true CFG reuses them (without a pooled vector they do not depend on the prompt).
    neg_txt, neg_vec, true_cfg: (B, L_txt, D), (B, vec_dim), (B,): true classifier-free
                   guidance as diffusers' FluxPipeline: v = v_neg + true_cfg (v - v_neg), v_neg
                   the velocity under the negative prompt (the same txt_ids and guidance);
                   neg_vec None for models without a pooled vector (FLUX.2).
    """

    start: Any = None
    image_latents: Any = None
    noise: Any = None
    mask: Any = None
    channels: Any = None
    ref_img: Any = None
    ref_ids: Any = None
    ref_time: Any = None
    neg_txt: Any = None
    neg_vec: Any = None
    true_cfg: Any = None

    def check(self) -> None:
        """Raise UsageError when the given fields do not make a whole (checked at trace time)."""
        groups = {"mask": ("image_latents", "noise", "mask"), "reference": ("ref_img", "ref_ids"),
                  "true CFG": ("neg_txt", "neg_vec", "true_cfg")}
        optional = ("neg_vec",)  # None for a model without a pooled vector (FLUX.2)
        for what, names in groups.items():
            given = [n for n in names if getattr(self, n) is not None]
            missing = [n for n in names if getattr(self, n) is None and n not in optional]
            if given and missing and not (what == "mask" and self.mask is None):
                raise UsageError(f"Conditioning: {what} needs {', '.join(names)}; got only {', '.join(given)}")
        if self.channels is not None and self.ref_img is not None:
            raise UsageError("Conditioning: channels and ref_img do not combine (no FLUX variant takes both)")
        if self.ref_time is not None and self.ref_img is None:
            raise UsageError("Conditioning: ref_time is the cached references' time: it needs ref_img and ref_ids")
        if self.ref_time is not None and self.neg_vec is not None:
            # the references' modulation would take each prompt's pooled vector: one cache per prompt
            raise UsageError("Conditioning: cached references (ref_time) do not combine with a negative pooled vector")


def euler_loop(model, params, img, img_ids, txt, txt_ids, vec, sigmas, guidance=None, on_step: StepCallback | None = None,
               adapters=None, lora_scales=None, cond: Conditioning | None = None):
    """Integrate the flow from sigmas[0] (or sigmas[cond.start]) to sigmas[-1] with Euler steps, as one loop.

    model:    a `fluxjax.models.flux.Flux` (static); params its parameters.
    img:      (B, L_img, 64) packed latents at the first step's time; kept in float32 across
              steps (both references round them to bf16 after each step in bf16 runs; float32
              is more exact).
    img_ids (B, L_img, n), txt (B, L_txt, context_dim), txt_ids (B, L_txt, n) (n = config.id_columns:
              3 in FLUX.1, 4 in FLUX.2), vec (B, vec_dim), or None for a model without one (FLUX.2).
    sigmas:   (N + 1,) float32 schedule; N = number of steps (a shape, so static under jit).
    guidance: (B,) float32 guidance strength for models with a guidance embedding, else None.
    on_step:  None, or a `StepCallback` (see `step_callback`) the loop calls on the host after each step.
    Under `Strategy.activate(mesh)` the activations are constrained as the strategy says.
    adapters: None, or a LoRA adapter tree (fluxjax.lora.adapters.Adapters.tree) run live, with
    lora_scales (B, n) float32: the strength of each of its n LoRAs on each image.
    cond:     None, or a `Conditioning` (image-conditioned sampling, true CFG).
    Returns (B, L_img, 64) float32 final latents.
    """
    cond = Conditioning() if cond is None else cond
    cond.check()
    batch, length = img.shape[:2]
    variables = lora.variables(params, adapters)
    lora_context = lambda: lora.live(lora_scales) if adapters is not None else contextlib.nullcontext()  # noqa: E731
    in_sequence = cond.ref_img is not None and cond.ref_time is None  # references appended to every call
    ids = jnp.concatenate([img_ids, cond.ref_ids.astype(img_ids.dtype)], axis=1) if in_sequence else img_ids
    ref_kv = None
    if cond.ref_time is not None:  # once per loop: the references alone (no text tokens) at their fixed time
        with lora_context():
            _, ref_kv = model.apply(variables, cond.ref_img, cond.ref_ids.astype(img_ids.dtype), txt[:, :0],
                                    txt_ids[:, :0], cond.ref_time.astype(jnp.float32), vec, guidance, return_kv=True)

    def velocity(x, t_vec, txt_, vec_):
        """The transformer's velocity for the L_img image tokens, float32."""
        if cond.channels is not None:
            x = jnp.concatenate([x, cond.channels.astype(x.dtype)], axis=-1)
        if in_sequence:
            x = jnp.concatenate([x, cond.ref_img.astype(x.dtype)], axis=1)
        with lora_context():
            pred = model.apply(variables, x, ids, txt_, txt_ids, t_vec, vec_, guidance, ref_kv=ref_kv)
        return pred[:, :length].astype(jnp.float32)

    def step(i, x):
        t_curr, t_prev = sigmas[i], sigmas[i + 1]
        t_vec = jnp.full((batch,), t_curr, jnp.float32)
        v = velocity(x, t_vec, txt, vec)
        if cond.neg_txt is not None:
            v_neg = velocity(x, t_vec, cond.neg_txt, cond.neg_vec)
            v = v_neg + cond.true_cfg.astype(jnp.float32)[:, None, None] * (v - v_neg)
        x = x + (t_prev - t_curr) * v
        if cond.mask is not None:
            known = scale_noise(cond.image_latents, cond.noise, t_prev)
            mask = cond.mask.astype(jnp.float32)
            x = (1.0 - mask) * known + mask * x
        if on_step is not None:
            jax.debug.callback(_report_step, on_step.token, i)
        return x

    start = 0 if cond.start is None else jnp.asarray(cond.start, jnp.int32)
    return jax.lax.fori_loop(start, sigmas.shape[0] - 1, step, img.astype(jnp.float32))


def scale_noise(image_latents, noise, sigma):
    """The flow's point at time sigma between image latents and noise: sigma noise + (1 - sigma) x0.

    As diffusers' FlowMatchEulerDiscreteScheduler.scale_noise (the same order of operations);
    img2img's starting latents and inpainting's known region. Arrays of one shape, float32.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma * noise.astype(jnp.float32) + (1.0 - sigma) * image_latents.astype(jnp.float32)


denoise = jit_with_rules(euler_loop, static_argnames=("model",))
"""`euler_loop` compiled once per model, shape, strategy and set of Conditioning fields: latents, text,
vectors, sigmas, guidance and the conditioning arrays are arguments, so a new seed, prompt, guidance,
schedule of the same length, image, mask, strength or step callback reuses the executable."""
