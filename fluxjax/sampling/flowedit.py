"""FlowEdit: inversion-free text-based editing of real images with FLUX, as one jitted loop.

Kulikov, Kleiner, Huberman-Spiegelglas, Michaeli, "FlowEdit: Inversion-Free Text-Based Editing
Using Pre-Trained Flow Models" (arXiv 2412.08629), Algorithm 1; docs/model-reference.md, "FlowEdit".
The edit moves along a direct path from the source image's latents X0 towards the target
prompt's distribution, integrating the difference of the model's velocities under the two
prompts at coupled noisy points (no inversion to noise):

    t_0 = 1 > t_1 > ... > t_T = 0: the model's own schedule for T steps (dev: resolution shift)
    Z_edit = X0;  steps i = T - n_max ... T - n_min - 1 (the FlowEdit phase):
        for each of n_avg draws N ~ N(0, I):  Z_src = (1 - t_i) X0 + t_i N;  Z_tar = Z_edit + Z_src - X0
        dV = mean over draws of v(Z_tar, target prompt, target guidance) - v(Z_src, source prompt, source guidance)
        Z_edit += (t_{i+1} - t_i) dV
    if n_min > 0, the last n_min steps sample the target from the noised edit (SDEdit-like):
        X = Z_edit + (1 - t_s) X0 + t_s N - X0 at s = T - n_min, then X += (t_{i+1} - t_i) v(X, target)
    The result is Z_edit (n_min = 0) or X.

Here all of it is one `jax.jit`: a `lax.fori_loop` per phase whose bounds (n_max, n_min) are
traced arguments, the n_avg draws batched with the source and target velocities in one
transformer call of batch 2 x n_avg per image. Image latents, prompts, guidance, seeds, n_max and
n_min are arguments: a new edit of the same size, T and n_avg does not recompile.

Noise: image b's draws at step i are `normal(fold_in(key(seed_b), i), (n_avg, L, C))` in the
packed layout (C = 64 features a token in FLUX.1, 128 in FLUX.2) (`step_noise`): an edit depends on its own seed only, whatever batch it runs in.
Z_tar is computed as Z_src + (Z_edit - X0) (the same value as the paper's order up to rounding),
so that with the target prompt and guidance equal to the source's, Z_tar is Z_src bit for bit,
dV is exactly zero and the edit returns X0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.errors import UsageError
from fluxjax.parallel.strategies import jit_with_rules


def check_variant(variant: str, name: str) -> None:
    """UsageError (one line) for a model FlowEdit cannot run: a Fill or control model's transformer
    takes extra input channels (the masked image, the control image) that an edit has none of."""
    needs = {"fill": "a masked image and a mask", "control": "a control image"}
    if variant in needs:
        raise UsageError(f"FlowEdit runs on plain text-to-image models (FLUX.1-dev, -schnell, Kontext); {name} is a "
                         f"{variant} model, whose transformer also needs {needs[variant]}")


@dataclass(frozen=True)
class EditSettings:
    """The hyperparameters of an edit (a field left None means the model's default).

    steps T: the schedule's length; n_max: edit steps taken (the first T - n_max are skipped, so
    the edit starts at noise level t_{T - n_max}); n_min: the last steps run as plain sampling of
    the target; n_avg: noise draws averaged per step; source/target guidance: the guidance
    embedding's value for each prompt (None for models without one, e.g. schnell).
    """

    steps: int | None = None
    n_max: int | None = None
    n_min: int | None = None
    n_avg: int | None = None
    source_guidance: float | None = None
    target_guidance: float | None = None

    def resolve(self, kind: str, guidance_embed: bool) -> "EditSettings":
        """These settings with the defaults of `kind` ("dev", "schnell", "tiny") filled in, checked.

        Raises UsageError naming the argument: n_min > n_max, n_max > steps, counts below their
        minimum, guidance given to a model without a guidance embedding.
        """
        d = DEFAULTS[kind]
        steps = d.steps if self.steps is None else self.steps
        given = {k: getattr(self, k) for k in ("n_max", "n_min", "n_avg")}
        n_max = min(d.n_max, steps) if given["n_max"] is None else given["n_max"]  # fewer steps: edit them all
        values = dict(steps=steps, n_max=n_max, n_min=d.n_min if given["n_min"] is None else given["n_min"],
                      n_avg=d.n_avg if given["n_avg"] is None else given["n_avg"])
        for name, value in values.items():
            low = 0 if name == "n_min" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
        if values["n_max"] > values["steps"]:
            raise UsageError(f"n_max {values['n_max']} is more than the {values['steps']} steps of the schedule "
                             "(n_max <= steps)")
        if values["n_min"] > values["n_max"]:
            raise UsageError(f"n_min {values['n_min']} is more than n_max {values['n_max']} (n_min <= n_max)")
        guidance = {}
        for name in ("source_guidance", "target_guidance"):
            value = getattr(self, name)
            if not guidance_embed:
                if value is not None:
                    raise UsageError(f"{name}: the model ({kind}) has no guidance embedding; leave it unset")
                guidance[name] = None
                continue
            value = getattr(d, name) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r}")
            guidance[name] = float(value)
        return EditSettings(**{k: int(v) for k, v in values.items()}, **guidance)


# The authors' published FLUX.1-dev settings (their FLUX_exp.yaml). schnell has no guidance
# input and a 4-step schedule; its n_max skips the first step as dev's 24 of 28 skip the first
# seventh (a proportional choice, not tuned on real weights). tiny is a CPU smoke test. FLUX.2
# (fluxjax/pipeline/flux2_edit.py): a distilled klein as schnell (4 steps, no guidance), FLUX.2 [dev]
# as FLUX.1-dev (its guidance embedding, the same settings: neither tuned on their weights).
DEFAULTS = {
    "dev": EditSettings(steps=28, n_max=24, n_min=0, n_avg=1, source_guidance=1.5, target_guidance=5.5),
    "schnell": EditSettings(steps=4, n_max=3, n_min=0, n_avg=1),
    "tiny": EditSettings(steps=4, n_max=3, n_min=0, n_avg=1, source_guidance=1.5, target_guidance=5.5),
}
DEFAULTS["klein"], DEFAULTS["flux2-dev"] = DEFAULTS["schnell"], DEFAULTS["dev"]


def seed_keys(seeds) -> np.ndarray:
    """(B, 2) uint32 key data of `jax.random.key(seed)` for each seed: the loop's `keys` argument."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])


def step_noise(key_data: jax.Array, step, n_avg: int, tokens: int, features: int = 64) -> jax.Array:
    """One image's draws at schedule step `step`: (n_avg, tokens, features) float32 standard normal.

    key_data: (2,) uint32 from `seed_keys`. The loop calls this traced; `noise` calls it on the
    host, so a reference can be fed the very same draws.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    return jax.random.normal(key, (n_avg, tokens, features), jnp.float32)


def noise(seeds, step: int, n_avg: int, tokens: int, features: int = 64) -> np.ndarray:
    """(B, n_avg, tokens, features) float32: the draws the loop takes at `step` for each seed."""
    keys = seed_keys(seeds)
    return np.stack([np.asarray(step_noise(jnp.asarray(k), step, n_avg, tokens, features)) for k in keys])


def flowedit_loop(model, params, x_src, img_ids, txt_src, vec_src, txt_tar, vec_tar, txt_ids, sigmas, keys,
                  guidance_src, guidance_tar, n_max, n_min, n_avg: int):
    """FlowEdit (module docstring) of a batch of B images, as two `lax.fori_loop`s.

    model:   a `fluxjax.models.flux.Flux` (static); params its parameters.
    x_src:   (B, L, C) packed source latents (conditioning.encode_packed; FLUX.2: flux2.encode_tokens,
             C = 128), float32.
    img_ids: (B, L, n); txt_src, txt_tar (B, L_txt, context_dim); txt_ids (B, L_txt, n) (n id columns: 3,
             FLUX.2 4); vec_src, vec_tar (B, vec_dim), or both None for a model without a pooled
             vector (FLUX.2): the prompts' conditioning (one text length for both).
    sigmas:  (T + 1,) float32 schedule from 1 to 0 (T a shape, so static).
    keys:    (B, 2) uint32 per-image key data (`seed_keys`).
    guidance_src, guidance_tar: (B,) float32, or None for models without a guidance embedding.
    n_max, n_min: int32 scalars (traced: changing them does not recompile); 0 <= n_min <= n_max <= T.
    n_avg:   draws per step (static: it sets the transformer's batch, 2 x n_avg per image).
    Under `Strategy.activate(mesh)` the activations are constrained as the strategy says; rows
    of one image stay together (image-major order), so a batch split over the data axes needs
    no exchange between devices.
    Returns (B, L, C) float32 edited latents.
    """
    batch, tokens, features = x_src.shape
    steps = sigmas.shape[0] - 1
    x_src = x_src.astype(jnp.float32)

    def rows(a, b):
        """(B, ...) source and target conditioning -> (B * 2 * n_avg, ...): image, then source/target, then draw."""
        both = jnp.stack([a, b], axis=1)
        both = jnp.broadcast_to(both[:, :, None], (batch, 2, n_avg) + a.shape[1:])
        return both.reshape((batch * 2 * n_avg,) + a.shape[1:])

    pair_txt, pair_vec = rows(txt_src, txt_tar), None if vec_src is None else rows(vec_src, vec_tar)
    pair_img_ids, pair_txt_ids = rows(img_ids, img_ids), rows(txt_ids, txt_ids)
    pair_guidance = None if guidance_src is None else rows(guidance_src, guidance_tar)

    def draws(i):
        return jax.vmap(lambda k: step_noise(k, i, n_avg, tokens, features))(keys)  # (B, n_avg, L, C)

    def edit_step(i, z_edit):
        t, t_next = sigmas[i], sigmas[i + 1]
        z_src = (1.0 - t) * x_src[:, None] + t * draws(i)
        z_tar = z_src + (z_edit - x_src)[:, None]
        x = jnp.stack([z_src, z_tar], axis=1).reshape(batch * 2 * n_avg, tokens, features)
        t_vec = jnp.full((x.shape[0],), t, jnp.float32)
        v = model.apply({"params": params}, x, pair_img_ids, pair_txt, pair_txt_ids, t_vec, pair_vec, pair_guidance)
        v = v.astype(jnp.float32).reshape(batch, 2, n_avg, tokens, features)
        return z_edit + (t_next - t) * jnp.mean(v[:, 1] - v[:, 0], axis=1)

    def sample_step(i, x):
        t, t_next = sigmas[i], sigmas[i + 1]
        t_vec = jnp.full((batch,), t, jnp.float32)
        v = model.apply({"params": params}, x, img_ids, txt_tar, txt_ids, t_vec, vec_tar, guidance_tar)
        return x + (t_next - t) * v.astype(jnp.float32)

    n_max, n_min = jnp.asarray(n_max, jnp.int32), jnp.asarray(n_min, jnp.int32)
    z_edit = jax.lax.fori_loop(steps - n_max, steps - n_min, edit_step, x_src)
    start = steps - n_min
    t_start = sigmas[start]
    noised = (1.0 - t_start) * x_src + t_start * draws(start)[:, 0] + (z_edit - x_src)
    x_tar = jax.lax.fori_loop(start, steps, sample_step, noised)
    return jnp.where(n_min > 0, x_tar, z_edit)


edit = jit_with_rules(flowedit_loop, static_argnames=("model", "n_avg"))
"""`flowedit_loop` compiled once per model, shape, T, n_avg and strategy."""
