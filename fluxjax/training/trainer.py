"""Rectified-flow fine-tuning of the FLUX transformer with optax: the loss, the train state, one
jitted step, optional EMA, sharding by the strategy files, and Orbax train checkpoints.

The loss (docs/model-reference.md, "Training loss"; the sampler's flow convention):
    x_t = (1 - t) x0 + t eps,   target v = eps - x0,   loss = mean((model(x_t, t) - v)^2)
over the packed latent tokens (B, L_img, 64), in float32. t is drawn logit-normal
(t = sigmoid(mean + std * n), n ~ N(0, 1)), then shifted by the model's schedule with
`sampling.Schedule.shift_timesteps`, the very function the sampler uses. Models with a guidance
embedding (dev) get a constant guidance input (default 1.0, as common FLUX fine-tuning recipes
use). Caption dropout replaces a sample's text with the empty prompt's.

Only the transformer is trained: the T5, CLIP and VAE outputs enter as cached arrays
(fluxjax.training.data), so the frozen encoders are never part of the gradient computation.

Parameters (`TrainConfig.param_dtype`): "float32" master weights (default) with bfloat16
compute, or "bfloat16" parameters and optimizer state. float32 is the default because a
bfloat16 weight has 8 significant bits: an AdamW update smaller than about 1/256 of the weight
is rounded away entirely, and at fine-tuning learning rates (1e-5..1e-4) that is most updates
(docs/training.md gives the measured fractions).

Use:
    trainer = Trainer(model, TrainConfig(...), schedule)          # or tx=any optax transform
    state = trainer.init(params, seed=0)
    state, metrics = trainer.step(state, batch)                   # one jit: forward, backward, update
    save_state(folder, state); state = restore_state(folder, trainer.abstract_state(params))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import warnings
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fluxjax.lora import live as lora_live, trainable as lora
from fluxjax.parallel import distributed
from fluxjax import files
from fluxjax.errors import CheckpointError, NonFiniteError, UsageError
from fluxjax.sampling.sampler import Schedule


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a training run turns. Learning-rate schedule: linear warmup over `warmup_steps` to
    `learning_rate`, then cosine decay to `final_lr_fraction * learning_rate` at `total_steps`.

    clip_norm: global-norm gradient clipping (None: off). ema_decay: keep an exponential moving
    average of the weights with this decay, warmed up by `ema_decay` (None: no EMA). logit_mean/logit_std: the
    logit-normal timestep draw. guidance: the guidance input of guidance-distilled models.
    caption_dropout: probability that a sample is trained with the empty prompt.
    param_dtype: "float32" (master weights, bf16 compute) or "bfloat16"; compute_dtype: the
    matmul dtype. remat: recompute each block's activations in the backward pass.
    lora_rank: train a LoRA of this rank instead of the weights (None: full fine-tuning);
    lora_alpha: its alpha (None: the rank); lora_targets: the Linears it adapts (Flax paths in
    the stacked layout, default lora.DEFAULT_TRAIN_TARGETS).
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_fraction: float = 0.0
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float | None = 1.0
    ema_decay: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance: float = 1.0
    caption_dropout: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = lora.DEFAULT_TRAIN_TARGETS

    def __post_init__(self):
        for field in dataclasses.fields(self):  # a NaN or infinite rate trains a NaN model without a word
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{field.name} must be a finite number, got {value}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise UsageError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if self.total_steps < 1:
            raise UsageError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise UsageError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UsageError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise UsageError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The default optimizer: global-norm clipping, then AdamW on the warmup + cosine schedule."""
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.learning_rate, peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, decay_steps=cfg.total_steps,
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    return adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree (what a train checkpoint holds).

    step: int32 scalar, the number of updates done; it is also the data position (batch `step`
    of fluxjax.training.data's deterministic order comes next). params: the trained parameters (with
    TrainConfig.lora_rank, the LoRA's a/b factors only: lora.split_factors of its adapter tree).
    opt_state: the optax state. ema: the EMA of params, or None. key: uint32 PRNG key data (the
    step's noise, timesteps and caption dropout are drawn from it).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    key: jax.Array


def sample_timesteps(key: jax.Array, batch: int, image_seq_len: int, schedule: Schedule,
                     mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """(batch,) float32 training timesteps: logit-normal(mean, std), then the schedule's
    `training_timesteps` (FLUX.1: shifted as the sampler shifts; FLUX.2: unshifted, as diffusers trains it)."""
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    return schedule.training_timesteps(t, image_seq_len).astype(jnp.float32)


def flow_matching_loss(model: nn.Module, params, x0, eps, t, img_ids, txt, txt_ids, vec, guidance=None,
                       adapters: dict | None = None) -> jax.Array:
    """Rectified-flow MSE: mean over batch, tokens and features of (model(x_t, t) - (eps - x0))^2.

    x0, eps: (B, L_img, 64) packed clean latents and noise; t: (B,) in [0, 1]; the rest are
    `Flux.apply`'s arguments (guidance (B,) or None). adapters: a LoRA adapter tree (n = 1,
    fluxjax.lora.adapters' layout) run live at strength 1 on top of `params`, or None. Returns a float32 scalar.
    """
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    tb = t.astype(jnp.float32)[:, None, None]
    x_t = (1.0 - tb) * x0 + tb * eps
    args = (x_t, img_ids, txt, txt_ids, t, vec, guidance)
    if adapters is None:
        pred = model.apply({"params": params}, *args)
    else:
        with lora_live.live(jnp.ones((x0.shape[0], 1), jnp.float32)):
            pred = model.apply(lora_live.variables(params, adapters), *args)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - (eps - x0)))


def ema_decay(decay: float, step) -> jax.Array:
    """The EMA decay used at update `step` (0-based): `decay`, held below (1 + step) / (10 + step).

    The average starts at the initial weights; with a fixed decay of 0.999 they would still
    weigh 0.999^500 = 61% after 500 steps and 8% after 2500, so a short run's EMA would be
    mostly its random initialisation. The warm-up (TensorFlow's ExponentialMovingAverage with
    num_updates) lets the average follow the weights closely at first.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def training_model(model: nn.Module, cfg: TrainConfig, platform: str | None = None) -> nn.Module:
    """`model` as the step runs it: cfg's dtypes and remat, and a differentiable attention.

    fluxjax's CPU attention kernel defines no gradient, and "auto" picks it on a CPU: both are
    replaced by XLA's attention ("cudnn" and "xla" are kept). On a TPU ("auto" is splash there,
    whose backward is its own pair of kernels) "auto" stays. platform: where the step runs (the
    mesh's devices'; None: this process's default backend).
    """
    platform = jax.default_backend() if platform is None else platform
    keep_auto = model.attention_impl == "auto" and platform == "tpu"
    impl = "xla" if model.attention_impl in ("auto", "cpu") and not keep_auto else model.attention_impl
    return model.clone(dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                       attention_impl=impl, remat=cfg.remat)


class Trainer:
    """One model's training: builds the optimizer, the state and the jitted step.

    model: a fluxjax Flux module (its dtype/attention are replaced, see `training_model`).
    cfg: TrainConfig. schedule: the model's sampling.Schedule (its shift is used for t).
    tx: any optax GradientTransformation (default `make_optimizer(cfg)`).
    strategy, mesh: a fluxjax.parallel.strategies.Strategy and its mesh to shard parameters, gradients,
    optimizer state and batch as the strategy's table says; None for one device.

    With cfg.lora_rank the state trains a new LoRA's factors (lora.new_adapters, the adapter
    module LoRA inference runs live); the base weights are frozen: they enter the jitted step as
    an argument outside the differentiated tree, so they get no gradient and no optimizer state.
    `init` and `restore` keep them (placed by the strategy) for `step`. The LoRA's state is
    small and replicated on every device (LoRA under a strategy is not yet tested on a mesh).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, schedule: Schedule,
                 tx: optax.GradientTransformation | None = None, strategy=None, mesh=None):
        self.cfg, self.schedule = cfg, schedule
        self.model = training_model(model, cfg, None if mesh is None else mesh.devices.flat[0].platform)
        self.tx = make_optimizer(cfg) if tx is None else tx
        self.strategy, self.mesh = strategy, mesh
        self.lora = cfg.lora_rank is not None
        self.frozen = None  # with LoRA: (base params, the adapters' fixed scale/bias), on the devices
        self.fixed = None  # with LoRA: the fixed scale/bias leaves on the host (to write the file)
        self._step = None

    def trainable(self, params, seed: int = 0):
        """What trains, from the model's `params`: the params themselves, or with LoRA the factors
        of a new LoRA on them (host arrays; its fixed leaves are kept in self.fixed)."""
        if not self.lora:
            return params
        adapters = lora.new_adapters(params, self.model.config, self.cfg.lora_rank, self.cfg.lora_alpha,
                                     self.cfg.lora_targets, seed)
        factors, self.fixed = lora.split_factors(adapters.tree)
        return factors

    def _freeze(self, params) -> None:
        """Keep the base `params` and the fixed adapter leaves on the devices for the LoRA step."""
        if self.strategy is None:
            self.frozen = jax.device_put((params, self.fixed))
            return
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.frozen = (jax.device_put(params, self.param_shardings()), jax.device_put(self.fixed, replicated))

    # -- state -------------------------------------------------------------------------------

    def param_shardings(self):
        """Tree of Sharding for the model's parameters (the strategy's table), or None for one device."""
        if self.strategy is None:
            return None
        from fluxjax.models.flux import param_shapes

        return self.strategy.param_shardings(self.mesh)(param_shapes(self.model))

    def state_shardings(self, params) -> TrainState | None:
        """Shardings of the whole TrainState of trained `params` (see `trainable`): optimizer
        moments and EMA laid out like their parameters, scalars (step, key, counts) replicated;
        a LoRA's factors replicated. None for one device."""
        if self.strategy is None:
            return None
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, params) if self.lora else self.param_shardings()
        opt_abstract = jax.eval_shape(self.tx.init, params)
        opt = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, shardings,
                                    transform_non_params=lambda _: replicated)
        ema = shardings if self.cfg.ema_decay is not None else None
        return TrainState(step=replicated, params=shardings, opt_state=opt, ema=ema, key=replicated)

    def init(self, params, seed: int = 0) -> TrainState:
        """A fresh TrainState from the model's `params` (what trains cast to cfg.param_dtype,
        placed by the strategy; with LoRA a new LoRA drawn from `seed`, `params` frozen)."""
        dtype = jnp.dtype(self.cfg.param_dtype)
        trained = self.trainable(params, seed)
        if self.lora:
            self._freeze(params)
        params = jax.tree.map(lambda p: jnp.asarray(p, dtype), trained)
        shardings = self.state_shardings(params)

        def make(params):
            ema = params if self.cfg.ema_decay is not None else None
            key = jax.random.key_data(jax.random.key(seed))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema=ema, key=key)

        if shardings is None:
            return jax.jit(make)(params)
        params = jax.device_put(params, shardings.params)
        with self.strategy.activate(self.mesh):
            return jax.jit(make, out_shardings=shardings)(params)

    def abstract_state(self, params) -> TrainState:
        """The TrainState's shapes, dtypes and shardings (to restore a checkpoint into), from the
        model's `params` or their shapes."""
        params = self.trainable(params)
        shardings = self.state_shardings(params)
        dtype = jnp.dtype(self.cfg.param_dtype)
        p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=p, opt_state=jax.eval_shape(self.tx.init, p),
            ema=p if self.cfg.ema_decay is not None else None,
            key=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        )
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), state)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)

    def restore(self, folder: str | os.PathLike, params) -> TrainState:
        """The TrainState saved at `folder` (see `save_state`) for the model's `params`; with LoRA
        `params` are kept frozen for `step`, as `init` does."""
        state = restore_state(folder, self.abstract_state(params))
        if self.lora:
            self._freeze(params)
        return state

    # -- the step ------------------------------------------------------------------------------

    def loss(self, params, batch: Mapping[str, jax.Array], key: jax.Array, frozen=None) -> jax.Array:
        """The step's loss on `batch` (see `step`) with noise, t and dropout drawn from `key`.
        With LoRA, `params` are the factors and `frozen` is (base params, fixed adapter leaves)."""
        x0 = batch["latents"]
        b, seq = x0.shape[0], x0.shape[1]
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = sample_timesteps(k_t, b, seq, self.schedule, self.cfg.logit_mean, self.cfg.logit_std)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        txt, vec = batch["txt"], batch.get("vec")  # FLUX.2 has no pooled vector
        if self.cfg.caption_dropout > 0:
            drop = jax.random.bernoulli(k_drop, self.cfg.caption_dropout, (b,))
            txt = jnp.where(drop[:, None, None], batch["empty_txt"].astype(txt.dtype), txt)
            if vec is not None:
                vec = jnp.where(drop[:, None], batch["empty_vec"].astype(vec.dtype), vec)
        guidance = jnp.full((b,), self.cfg.guidance, jnp.float32) if self.model.config.guidance_embed else None
        adapters = None
        if self.lora:
            base, fixed = frozen
            params, adapters = base, lora.join_factors(params, fixed)
        return flow_matching_loss(self.model, params, x0, eps, t, batch["img_ids"], txt, batch["txt_ids"], vec, guidance,
                                  adapters)

    def _update(self, state: TrainState, batch, frozen) -> tuple[TrainState, dict]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        loss, grads = jax.value_and_grad(self.loss)(state.params, batch, step_key, frozen)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = ema_decay(self.cfg.ema_decay, state.step)
            ema = jax.tree.map(lambda e, p: (d * e.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(e.dtype), ema, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, key=jax.random.key_data(key))
        return new, metrics

    def lower_step(self, state: TrainState, batch: Mapping[str, Any], frozen=None):
        """The step lowered for abstract `state` (see `abstract_state`), `batch` and, with LoRA,
        `frozen` (ShapeDtypeStructs with shardings), ahead of time: `.compile()` it for the mesh's
        devices, which may be a TPU topology's (fluxjax/plan/tpu.py). Nothing is placed."""
        shardings = self.state_shardings(state.params)
        step = jax.jit(self._update, donate_argnums=0, out_shardings=None if shardings is None else (shardings, None))
        if self.strategy is None:
            return step.lower(state, batch, frozen)
        with self.strategy.activate(self.mesh):
            return step.lower(state, batch, frozen)

    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        """One update, compiled once per batch shape.

        batch: latents (B, L_img, 64) packed clean latents (float32), img_ids (B, L_img, 3),
        txt (B, L_txt, context_dim), txt_ids (B, L_txt, 3), vec (B, vec_dim); with
        caption_dropout > 0 also empty_txt (1, L_txt, context_dim) and empty_vec (1, vec_dim),
        the empty prompt's embeddings. FLUX.2: latents (B, L_img, 128), ids of 4 columns, no vec
        or empty_vec (fluxjax.training.data). Host arrays are placed by the strategy (B must divide
        its data axes: a padded row would be trained on). Returns (new state, {"loss",
        "grad_norm"} float32 scalars).
        """
        if self.lora and self.frozen is None:
            raise UsageError("a LoRA Trainer steps after init() or restore(), which keep the frozen base weights")
        if self._step is None:
            shardings = self.state_shardings(state.params)
            self._step = jax.jit(self._update, donate_argnums=0,
                                 out_shardings=None if shardings is None else (shardings, None))
        if self.strategy is None:
            return self._step(state, batch, self.frozen)
        batch = self.place_batch(batch)
        with self.strategy.activate(self.mesh):
            return self._step(state, batch, self.frozen)

    def place_batch(self, batch: Mapping[str, Any]) -> dict:
        """Host batch -> arrays on the mesh: per-sample entries split along the data axes,
        the empty-prompt entries replicated."""
        n = self.strategy.data_size(self.mesh)
        b = np.shape(batch["latents"])[0]
        if b % n:
            raise UsageError(f"batch size {b} does not divide over the {n}-way data axes of strategy {self.strategy.name!r}")
        out = {}
        for name, x in batch.items():
            x = np.asarray(x)
            if name.startswith("empty_"):
                sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            else:
                sharding = self.strategy.batch_sharding(self.mesh, x.ndim)
            out[name] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
        return out


# -- checkpoints --------------------------------------------------------------------------------


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp  # slow to import: only when a checkpoint is touched

    return ocp


def _as_tree(state: TrainState) -> dict:
    """The state as nested dicts/lists Orbax stores (optax states are namedtuples)."""
    return flax.serialization.to_state_dict(state)


def save_state(folder: str | os.PathLike, state: TrainState) -> None:
    """Write `state` as an Orbax checkpoint at `folder`, atomically.

    Orbax writes into a temporary folder and renames it when complete, so `folder` either holds
    a whole checkpoint or does not exist; a kill mid-save leaves only a temporary folder, which
    `latest_checkpoint` ignores. An existing `folder` is replaced.

    With several processes every one calls this (each writes its own shards); process 0 alone
    removes an existing `folder`, and none starts writing before that is done.
    """
    folder = os.path.abspath(os.fspath(folder))
    if distributed.is_primary() and os.path.exists(folder):
        shutil.rmtree(folder)
    distributed.barrier("fluxjax-train-save")
    _ocp().save(folder, _as_tree(state))


def restore_state(folder: str | os.PathLike, abstract: TrainState) -> TrainState:
    """The TrainState saved at `folder`, each array read straight into the sharding `abstract`
    (from `Trainer.abstract_state`) gives it."""
    folder = os.path.abspath(os.fspath(folder))
    tree = _ocp().load(folder, _as_tree(abstract))
    return flax.serialization.from_state_dict(abstract, tree)


CHECKPOINT_PREFIX = "step_"


def checkpoint_path(root: str | os.PathLike, step: int) -> str:
    """root/step_00000042: the checkpoint after `step` updates."""
    return os.path.join(os.fspath(root), f"{CHECKPOINT_PREFIX}{step:08d}")


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The complete checkpoint of the most steps under root, or None (temporary folders of an
    interrupted save are not complete checkpoints)."""
    done = complete_checkpoints(root)
    return done[0] if done else None


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """The complete checkpoints under root, newest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    done = [n for n in os.listdir(root) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()
            and _ocp().is_orbax_checkpoint(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(done, reverse=True)]


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint of a run could not be read; an older one was resumed from."""


def restore_newest_intact(trainer: "Trainer", root: str | os.PathLike, params) -> TrainState:
    """The state of the newest checkpoint under root that reads back whole: a damaged newest one
    (a data file lost or cut, its metadata gone) is passed over, saying so in one warning, for the
    one before it (a run keeps two). CheckpointError when none can be read."""
    found = complete_checkpoints(root)
    for i, path in enumerate(found):
        error = None
        try:
            state = trainer.restore(path, params)
            bad = first_non_finite(state)
            if bad is not None:  # damage the file format does not catch (zeroed bytes that still decode)
                error = CheckpointError(f"{bad} holds NaN or infinite values")
        except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, RuntimeError or their own
            error = e
        # Each process reads its own shards: all must have read theirs, or all pass to the next.
        if distributed.everywhere(error is None):
            return state
        reason = "another process of the run could not read its part" if error is None else _first_line(error)
        if error is not None and "tree structures do not match" in str(error):  # another shape: not damage
            raise UsageError(f"{path}: holds a train state of another shape than this run's (a LoRA or EMA "
                             "setting differs from the run that wrote it); resume with that run's "
                             "settings") from None
        if i + 1 == len(found):
            raise CheckpointError(f"{path}: cannot be read ({reason}), and no older checkpoint can: remove "
                                  f"{os.fspath(root)} to start the run again") from None
        warnings.warn(f"{path}: cannot be read ({reason}); resuming from {found[i + 1]}", CheckpointFallbackWarning)
    raise CheckpointError(f"{os.fspath(root)}: holds no complete checkpoint")


def first_non_finite(tree) -> str | None:
    """The path of the first floating-point leaf of `tree` holding NaN or infinite values, or None.
    Checked on the devices (one scalar per leaf comes back), so sharded state is not gathered."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    floats = [(path, x) for path, x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in floats])
    for (path, _), ok in zip(floats, finite):
        if not bool(ok):
            return jax.tree_util.keystr(path)
    return None


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of the error's root cause: Orbax wraps TensorStore's precise one (DATA_LOSS:
    ... "opt_state.1.0.mu..." ...) in a generic one holding a repr of the whole array spec."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def prune_checkpoints(root: str | os.PathLike, keep: int = 2) -> None:
    """Delete all but the `keep` newest complete checkpoints under root."""
    root = os.fspath(root)
    done = sorted(n for n in os.listdir(root) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit())
    for name in done[:-keep]:
        shutil.rmtree(os.path.join(root, name))


# -- a whole run --------------------------------------------------------------------------------

CHECKPOINTS, CACHE, MODEL, MODEL_EMA = "checkpoints", "cache", "model", "model_ema"
LORA_FILE, LORA_EMA_FILE = "lora.safetensors", "lora_ema.safetensors"
LOSS_CSV, LOSS_PNG = "loss.csv", "loss.png"
FROZEN = {"vae": "vae", "text_encoder": "clip", "text_encoder_2": "t5"}  # hub folder -> pipeline component
RUN_MARKER = "fluxjax-train.json"  # in --out: written by fluxjax train, with the settings --resume must keep
# Everything a run writes directly in --out (model/'s staging folder aside: fluxjax.files).
RUN_ENTRIES = {CHECKPOINTS, CACHE, MODEL, MODEL_EMA, LORA_FILE, LORA_EMA_FILE, f"{LORA_FILE}.partial",
               f"{LORA_EMA_FILE}.partial", LOSS_CSV, LOSS_PNG, RUN_MARKER}
# The settings --resume must keep, as each changes the result, and their `fluxjax train` flags
# (--steps may change: a resumed run may go further).
RESUME_FLAGS = {
    "batch_size": "--batch-size", "seed": "--seed", "resolution": "--resolution",
    "max_sequence_length": "--max-sequence-length", "learning_rate": "--lr", "warmup_steps": "--warmup",
    "weight_decay": "--weight-decay", "clip_norm": "--clip-norm", "ema_decay": "--ema", "guidance": "--guidance",
    "caption_dropout": "--caption-dropout", "param_dtype": "--param-dtype", "compute_dtype": "--dtype",
    "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
    "final_lr_fraction": "final_lr_fraction", "b1": "b1", "b2": "b2", "logit_mean": "logit_mean",
    "logit_std": "logit_std",
}


def run_settings(cfg: TrainConfig, batch_size: int, seed: int, resolution: int,
                 max_sequence_length: int | None) -> dict:
    """The settings of a run that --resume must keep (RESUME_FLAGS), as JSON values."""
    given = dict(dataclasses.asdict(cfg), batch_size=batch_size, seed=seed, resolution=resolution,
                 max_sequence_length=max_sequence_length)
    return json.loads(json.dumps({name: given[name] for name in RESUME_FLAGS}))


def check_out_dir(out_dir: str | os.PathLike, resume: bool, settings: dict | None = None) -> str | None:
    """The newest checkpoint of the run in out_dir (None for a new run), or UsageError in one line:

    out_dir must be new, empty or a run fluxjax train wrote (RUN_MARKER, or an older fluxjax's
    checkpoints/; nothing but RUN_ENTRIES in it), and its model/ and model_ema/, which the run
    replaces at the end, each entirely fluxjax train's (fluxjax.files.owned_why). A run's
    checkpoints are continued only with `resume` (a new run must not overwrite another's) and with
    the `settings` (run_settings) the run was started with, where it recorded them.
    """
    out = os.fspath(out_dir)
    if not os.path.lexists(out):
        files.check_creatable(out, "--out")
        return None
    if not os.path.isdir(out):
        raise UsageError(f"{out}: is a file; --out names the run's folder")
    entries = set(os.listdir(out))
    staging = tuple(f"{name}{files.STAGING}" for name in (MODEL, MODEL_EMA))
    extra = sorted(e for e in entries if e not in RUN_ENTRIES and not e.startswith(staging))
    why = (f"it holds {files.shown(extra)}, which fluxjax train does not write" if extra else
           f"no {RUN_MARKER} or {CHECKPOINTS}/ in it" if entries and not entries & {RUN_MARKER, CHECKPOINTS} else "")
    if why:
        raise UsageError(f"{out}: already exists and was not written by fluxjax train ({why}); fluxjax train writes "
                         "into a new or empty folder or continues its own run: choose another --out")
    for name in (MODEL, MODEL_EMA):
        path = os.path.join(out, name)
        why = os.path.lexists(path) and files.owned_why(path, "train")
        if why:
            raise UsageError(f"{path}: not written by fluxjax train ({why}), and the run replaces it at the end: "
                             "move it elsewhere or choose another --out")
    latest = latest_checkpoint(os.path.join(out, CHECKPOINTS))
    if latest is not None and not resume:
        raise UsageError(f"{out}: holds checkpoints of a run; pass --resume to continue it or choose another --out")
    recorded = _read_run_marker(out).get("settings")
    if latest is not None and settings is not None and isinstance(recorded, dict):
        changed = [f"{RESUME_FLAGS[k]} {_shown_setting(settings[k])} (the run has {_shown_setting(recorded.get(k))})"
                   for k in RESUME_FLAGS if k in recorded and settings[k] != recorded[k]]
        if changed:
            raise UsageError(f"{out}: --resume with settings that change the run: {', '.join(changed)}; resume with "
                             "the run's settings, or start a new run in another --out")
    return latest


def _shown_setting(value) -> str:
    return "none" if value is None else ",".join(value) if isinstance(value, list) else str(value)


def _read_run_marker(out: str) -> dict:
    try:
        with open(os.path.join(out, RUN_MARKER), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_run_marker(out: str, settings: dict | None) -> None:
    path = os.path.join(out, RUN_MARKER)
    with open(f"{path}.partial", "w", encoding="utf-8") as f:
        json.dump({"writer": "train", "settings": settings}, f, indent=1)
    os.replace(f"{path}.partial", path)


def fit(pipe, examples, out_dir: str | os.PathLike, cfg: TrainConfig, *, batch_size: int = 1, seed: int = 0,
        save_every: int = 100, resume: bool = False, resolution: int = 512, max_sequence_length: int | None = None,
        source: str | os.PathLike | None = None, tx: optax.GradientTransformation | None = None,
        progress: bool = False) -> TrainState:
    """Fine-tune `pipe`'s transformer on `examples` (fluxjax.training.data.scan_folder) for cfg.total_steps.

    out_dir receives: cache/ (latents and embeddings), checkpoints/step_N (the whole TrainState
    every `save_every` steps and at the end, the two newest kept), loss.csv (step, loss,
    grad_norm, lr-free), loss.png, and model/ (a hub-layout folder: the trained transformer as
    a fluxjax component, the frozen components linked from `source`, or written out for the tiny
    preset), which `FluxPipeline.from_pretrained` and `fluxjax generate --model` take; with EMA
    also model_ema/. With cfg.lora_rank, instead of model/: lora.safetensors (diffusers/PEFT
    layout, lora.save_diffusers), which diffusers' `load_lora_weights` and fluxjax's `--lora` /
    `loras=` read (with EMA also lora_ema.safetensors).
    A FLUX.2 pipeline (a klein base folder, flux2.Flux2Pipeline) trains LoRAs only, on the
    FLUX.2 VAE's tokens and the stacked text-encoder states (fluxjax.training.data), without
    a timestep shift (sampling.Flux2Schedule.training_timesteps); its file has
    Flux2Transformer2DModel's names, for Flux2KleinPipeline.load_lora_weights.
    resume: continue from the newest checkpoint, bit for bit as if never stopped.
    The pipeline's strategy (if any) shards the train state. Returns the final TrainState.
    out_dir must be new, empty or this run's (`check_out_dir`); a second run on it at the same
    time is refused (fluxjax.files.locked).

    Several processes (jax.distributed; the strategy's mesh spans all their devices) run `fit`
    together with the same arguments on a shared filesystem: each takes part in every collective
    (the steps, the encoders, the Orbax saves and restores of sharded arrays), and process 0
    alone checks and locks out_dir and writes every other file (cache, loss.csv/png, the run
    marker, the LoRA file, model/'s files besides the weights, its manifest and the swap).
    """
    out_dir = os.fspath(out_dir)
    with locked_on_primary(out_dir):  # one run at a time in out_dir
        return _fit(pipe, examples, out_dir, cfg, batch_size, seed, save_every, resume, resolution,
                    max_sequence_length, source, tx, progress)


def _fit(pipe, examples, out_dir: str, cfg: TrainConfig, batch_size, seed, save_every, resume, resolution,
         max_sequence_length, source, tx, progress) -> TrainState:
    from tqdm import tqdm

    from fluxjax.training.data import Batches, EncodedDataset, bucket, is_flux2_pipeline

    ckpt_root = os.path.join(out_dir, CHECKPOINTS)
    check_processes(pipe.strategy)
    if is_flux2_pipeline(pipe) and cfg.lora_rank is None:
        raise UsageError(f"{pipe.name} is a FLUX.2 model: fluxjax trains LoRAs of it only for now (give a LoRA rank, "
                         "--lora-rank)")
    progress = progress and distributed.is_primary()  # one progress bar per job
    settings = run_settings(cfg, batch_size, seed, resolution, max_sequence_length)
    latest = distributed.on_primary(check_out_dir, out_dir, resume, settings)
    if save_every < 1:
        raise UsageError(f"save_every must be at least 1, got {save_every}")
    batches = Batches([bucket(e.width, e.height, resolution) for e in examples], batch_size, seed)
    distributed.on_primary(_start_run, out_dir, latest, settings)
    length = max_sequence_length or pipe.defaults.max_sequence_length
    data = EncodedDataset(examples, pipe, resolution, length, os.path.join(out_dir, CACHE), progress)

    params = pipe.transformer.params
    trainer = Trainer(pipe.transformer.model, cfg, pipe.schedule, tx, pipe.strategy, pipe.mesh)
    if latest is not None:
        state = restore_newest_intact(trainer, ckpt_root, params)
    else:
        state = trainer.init(params, seed)
    del params
    start = int(state.step)
    primary = distributed.is_primary()
    log = _LossLog(os.path.join(out_dir, LOSS_CSV), start) if primary else None
    with tqdm(total=cfg.total_steps, initial=start, desc="training", unit="step", disable=not progress or None) as bar:
        for step in range(start, cfg.total_steps):
            state, metrics = trainer.step(state, data.batch(batches.indices(step)))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):  # nothing after this step is worth keeping: stop before writing it
                last = latest_checkpoint(ckpt_root)
                raise NonFiniteError(f"training diverged at step {step + 1}: the loss is {loss}; no model was written"
                                     + (f", the last checkpoint is {last}" if last else ""))  # replicated: every process holds it
            if log is not None:
                log.add(step + 1, loss, float(metrics["grad_norm"]))
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if (step + 1) % save_every == 0 or step + 1 == cfg.total_steps:
                save_state(checkpoint_path(ckpt_root, step + 1), state)
                if primary:  # after save_state: every process has written its part of the new one
                    prune_checkpoints(ckpt_root)
    if log is not None:
        log.plot(os.path.join(out_dir, LOSS_PNG))
    if trainer.lora:
        write_lora(os.path.join(out_dir, LORA_FILE), trainer, state.params)
        if state.ema is not None:
            write_lora(os.path.join(out_dir, LORA_EMA_FILE), trainer, state.ema)
        return state
    try:
        write_model(os.path.join(out_dir, MODEL), pipe, state.params, source)
        if state.ema is not None:
            write_model(os.path.join(out_dir, MODEL_EMA), pipe, state.ema, source)
    except FileExistsError as e:  # model/ changed during the run: the state is safe in the last checkpoint
        raise FileExistsError(f"{e}; the trained state is in {checkpoint_path(ckpt_root, int(state.step))}: move "
                              "the folder aside and run again with --resume to write it") from None
    return state


def write_lora(path: str, trainer: Trainer, factors) -> None:
    """A LoRA Trainer's trained `factors` as a diffusers/PEFT LoRA file, written under a
    temporary name and renamed (a reader never sees half a file). With several processes every
    one calls it (the factors are gathered collectively); process 0 writes."""
    tree = lora.join_factors(jax.tree.map(distributed.host_array, factors), trainer.fixed)
    if distributed.is_primary():
        lora.save_diffusers(f"{path}.partial", tree, trainer.model.config)
        os.replace(f"{path}.partial", path)
    distributed.barrier("fluxjax-train-lora")  # the file is whole when any process returns


def check_processes(strategy) -> None:
    """UsageError unless the run can span this job's processes: several need a strategy, whose
    mesh spreads the state over all their devices (without one it would sit on process 0's)."""
    if strategy is None and jax.process_count() > 1:
        raise UsageError(f"training on {jax.process_count()} processes needs --sharding (e.g. fsdp) to place the "
                         "train state on the devices of all of them")


def _start_run(out_dir: str, latest: str | None, settings: dict) -> None:
    """Make out_dir and its run marker (process 0, after check_out_dir)."""
    os.makedirs(out_dir, exist_ok=True)
    if latest is None or not os.path.exists(os.path.join(out_dir, RUN_MARKER)):
        _write_run_marker(out_dir, settings if latest is None else None)  # an older fluxjax's run: settings unknown


@contextlib.contextmanager
def locked_on_primary(out_dir: str):
    """files.locked(out_dir) taken by process 0 only (one lock per run, not one per process);
    a refusal is raised on every process."""
    with contextlib.ExitStack() as stack:
        distributed.on_primary(lambda: stack.enter_context(files.locked(out_dir, "--out")))
        yield


@contextlib.contextmanager
def _staged_everywhere(folder: str):
    """fluxjax.files.staged(folder) for every process: process 0 checks `folder`, makes the
    staging folder (named by its PID, so one for the whole job) and, once every process has
    written its part into it, writes the manifest and swaps it in. The others write into that
    same folder. A single process: just files.staged."""
    with contextlib.ExitStack() as stack:
        tmp = distributed.on_primary(lambda: stack.enter_context(files.staged(folder, "train", overwrite=True)))
        yield tmp
        distributed.barrier("fluxjax-train-staged")  # every process's part is written
        distributed.on_primary(stack.close)


class _LossLog:
    """loss.csv, one row per step, flushed as written; on resume the rows past the restored step
    (written after the last checkpoint by the stopped run) are dropped, so the file matches the run."""

    HEADER = "step,loss,grad_norm\n"

    def __init__(self, path: str, start: int):
        self.path = path
        rows = []
        if start and os.path.isfile(path):
            with open(path) as f:
                rows = [r for r in f.readlines()[1:] if r.strip() and int(r.split(",")[0]) <= start]
        with open(path, "w") as f:
            f.write(self.HEADER + "".join(rows))

    def add(self, step: int, loss: float, grad_norm: float) -> None:
        with open(self.path, "a") as f:
            f.write(f"{step},{loss:.8g},{grad_norm:.8g}\n")

    def plot(self, png: str) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        table = np.loadtxt(self.path, delimiter=",", skiprows=1, ndmin=2)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(table[:, 0], table[:, 1], lw=0.8, label="loss")
        if len(table) >= 10:  # a running mean shows the trend under the noise of t and eps
            k = max(5, len(table) // 20)
            ax.plot(table[k - 1:, 0], np.convolve(table[:, 1], np.ones(k) / k, "valid"), lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("rectified-flow MSE")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def write_model(folder: str, pipe, transformer_params, source: str | os.PathLike | None) -> None:
    """A hub-layout folder `FluxPipeline.from_pretrained(folder)` loads: transformer/ holds
    `transformer_params` as a fluxjax component; the frozen components are symlinks into
    `source` (a hub folder), or, when source is None (the tiny preset), written as components
    beside locally made tokenizers. Staged and swapped in by fluxjax.files.staged, which
    replaces an existing `folder` only when it is entirely one fluxjax train wrote (its manifest
    says so: `fluxjax convert --overwrite` refuses such a folder in turn).

    With several processes every one calls it: each writes its shards of the weights (one
    collective Orbax save per component); process 0 writes the rest (see _staged_everywhere).
    """
    from fluxjax.loading.checkpoint import PARAMS, flat, write_marker

    primary = distributed.is_primary()
    with _staged_everywhere(folder) as tmp:
        components = [("transformer", "flux", pipe.transformer.model.config, transformer_params)]
        if source is None:
            components += [(hub_name, attr, getattr(pipe, attr).model.config, getattr(pipe, attr).params)
                           for hub_name, attr in FROZEN.items()]
        for hub_name, kind, config, params in components:
            if primary:
                os.makedirs(os.path.join(tmp, hub_name))
                write_marker(os.path.join(tmp, hub_name), kind, config, jax.tree.leaves(params)[0].dtype)
            distributed.barrier("fluxjax-train-component")  # its folder exists before anyone saves into it
            # Orbax straight from the devices: each process saves its own shards, none gathers the whole.
            _ocp().save(os.path.abspath(os.path.join(tmp, hub_name, PARAMS)),  # Orbax takes no relative path
                        flax.traverse_util.unflatten_dict(flat(params), sep="/"))
        if primary and source is not None:
            source = os.path.abspath(os.fspath(source))
            for name in sorted(os.listdir(source)):
                if name != "transformer":
                    os.symlink(os.path.join(source, name), os.path.join(tmp, name))
        elif primary:
            from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

            make_tokenizers(tmp)
