"""Train the built-in `shapes` model: a small FLUX.1 (the same Flux, T5, CLIP and VAE classes and
the same FluxPipeline) that draws the captions of `fluxjax.shapes.dataset`.

    python -m fluxjax.shapes.recipe --seed 0 --out fluxjax/shapes/weights

A research script over the library code, in four steps. The VAE and the transformer learn from
images of the SEEN combinations only (no image of `shapes.HELD_OUT` is drawn here); the text
encoders, which see text and no image, learn every caption of the grammar, as FLUX's T5 and CLIP
were pretrained on text apart from the images FLUX learnt:
1. tokenizers learnt on the grammar's captions (fluxjax.pipeline.tiny_tokenizers); small T5 and CLIP text
   encoders, trained for --text-steps to state each caption's colour, shape, background and
   position (`train_text_encoders`), then frozen; `readout_accuracy` measures how linearly they
   state them, `text_separation` that swapping the two colours moves their outputs;
2. the VAE (fluxjax's AutoEncoder, 16 latent channels, factor 8, small widths), trained here on
   random 64-px windows: absolute error of the reconstruction from the posterior mean plus a
   little noise (see `train_vae`); then its latent normalisation (shift_factor, scale_factor)
   is set from the posterior means of the pool, so the flow model sees latents of mean 0 and
   variance 1, as FLUX's VAE gives;
3. the transformer, trained with fluxjax.training.trainer's Trainer (rectified flow, logit-normal t, AdamW,
   EMA) on the VAE's posterior-mean latents of a fixed pool of drawn images and the frozen
   encoders' embeddings of their captions;
4. a hub-layout folder (model_index.json, scheduler/, transformer/, vae/, text_encoder/,
   text_encoder_2/, tokenizer/, tokenizer_2/, defaults.json), weights stored in bfloat16 (what
   FluxPipeline.from_pretrained runs by default), written under a temporary name and renamed.

defaults.json holds the settings the model's accuracy is measured at (`fluxjax bench shapes`).
Everything is drawn from --seed: the same seed on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fluxjax.shapes import dataset as shapes
from fluxjax.sampling import sampler as sampling
from fluxjax.loading.checkpoint import PARAMS, save_params, write_marker
from fluxjax.config import AutoEncoderConfig, CLIPConfig, FluxConfig, T5Config
from fluxjax.loading.registry import random_component
from fluxjax.models.autoencoder import AutoEncoder
from fluxjax.pipeline.text import PromptTokenizer, encode_prompts_jit
from fluxjax.pipeline.tiny_tokenizers import make_tokenizers
from fluxjax.training.trainer import Trainer, TrainConfig

SIZE = 128  # image side: 8 x 8 image tokens; a shape (46-51 px) spans about 6 x 6 latent pixels, 3 x 3 tokens
MAX_SEQUENCE_LENGTH = 16  # the longest caption is 14 T5 tokens plus </s>
NUM_STEPS = 16  # Euler steps of sampling (the defaults.json the bench measures at)
SCHEDULE = sampling.Schedule.schnell()  # no timestep shift: few image tokens, and no guidance embedding

T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
CLIP_CONFIG = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
# widths 16, 16, 32, 64: on this CPU 16 channels at full resolution cost no more than 8 (0.52 against
# 0.58 s a step), and held-out triangles came back right 29/33 against 21/33 (same recipe, 1200 steps)
VAE_CONFIG = AutoEncoderConfig(ch=16, ch_mult=(1, 1, 2, 4), num_res_blocks=1, z_channels=16, norm_num_groups=4,
                               scale_factor=1.0, shift_factor=0.0)  # normalisation measured after training
FLUX_CONFIG = dict(hidden_size=128, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12),
                   guidance_embed=False)
STORED_DTYPE = jnp.bfloat16
VAE_WINDOW = 64  # the VAE trains on random windows of this side (multiples of 8 px apart), see train_vae
VAE_LATENT_NOISE = 0.2  # std of the noise added to the decoder's input, in units of the latents' std
VAE_EDGE_WEIGHT = 4.0  # the VAE's loss weighs pixels on an edge (`edge_mask`) 1 + this, flat ones 1
ATTRIBUTE_CLASSES = {"color": tuple(shapes.PALETTE), "shape": shapes.SHAPES, "background": tuple(shapes.PALETTE),
                     "position": (shapes.CENTER, *shapes.POSITIONS)}  # what the text encoders learn to state


def tokenizer_corpus() -> list[str]:
    """Every caption of the grammar, then each of its words alone 50 times: sentencepiece's
    unigram trainer seeds whole-word pieces only for words frequent on their own (with the
    captions alone it spells colour names letter by letter)."""
    captions = shapes.all_captions()
    words = sorted({w for c in captions for w in c.split()})
    return captions + words * 50


# -- text -----------------------------------------------------------------------------------------


def text_encoders(tokenizer: PromptTokenizer, seed: int):
    """Frozen random T5 and CLIP sized for the tokenizers: ((t5_model, t5_params), (clip_model, clip_params))."""
    t5 = random_component("t5", T5Config(vocab_size=len(tokenizer.t5), **T5_CONFIG), seed=seed, attention_impl="xla")
    clip = random_component("clip", CLIPConfig(vocab_size=len(tokenizer.clip.get_vocab()), **CLIP_CONFIG),
                            seed=seed + 1, attention_impl="xla")
    return t5, clip


def attribute_labels(captions: list[str]) -> np.ndarray:
    """(N, 4) int32: each caption's index in every ATTRIBUTE_CLASSES list (colour, shape, background, position)."""
    parsed = [shapes.parse(c) for c in captions]
    return np.array([[classes.index(getattr(c, name)) for name, classes in ATTRIBUTE_CLASSES.items()]
                     for c in parsed], np.int32)


def train_text_encoders(tokenizer: PromptTokenizer, t5, clip, captions: list[str], steps: int, seed: int,
                        batch: int = 128, lr: float = 3e-3, progress: bool = True):
    """Teach the random T5 and CLIP to state each caption's four attributes, then hand them back to
    be frozen: returns ((t5_model, t5_params), (clip_model, clip_params)), float32.

    Why: FLUX gives every text token the RoPE position 0, so the transformer reads T5's outputs as
    a set, and the random encoders keep word order only weakly (T5's relative position bias,
    CLIP's position embedding): which colour is the shape's and which the background's must be
    in the outputs themselves. The objective says exactly that: one linear softmax head per
    attribute (ATTRIBUTE_CLASSES) on the mean of T5's outputs (all MAX_SEQUENCE_LENGTH positions,
    as the transformer gets them) and one on CLIP's pooled vector; cross-entropy summed over the
    eight heads, Adam at a constant rate. The heads are thrown away; the encoders are not trained
    further. (With batch 64 and a decaying rate, a run's T5 still mixed up the two colours of
    held-out captions after 400 steps: readout 32%, where batch 128 at 3e-3 reaches 89% of shape
    colours after 400 steps and 92.5% after 800, the command's default.)

    The command passes every caption of the grammar, held-out combinations included: text
    alone, no image. Trained on SEEN captions only, T5 stated the colours of held-out ones 92.5%
    and 94% of the time (linear readout), and the transformer, reading those outputs, drew
    held-out shapes right 69% of the time; the same transformer given outputs of encoders that
    also learnt the held-out captions (their seen outputs held within 0.5%) drew 76% right, and
    after 3000 more steps 86% (a probe on the previous shipped weights). This recipe, with 7500
    transformer steps, draws 94% of held-out shapes right (`fluxjax bench shapes`).
    """
    from tqdm import tqdm

    from fluxjax.pipeline.text import encode_prompts

    labels = attribute_labels(captions)
    t5_ids, clip_ids = tokenizer(captions, MAX_SEQUENCE_LENGTH)
    keys = jax.random.split(jax.random.key(seed + 2), 2 * len(ATTRIBUTE_CLASSES))
    widths = {"t5": t5[0].config.d_model, "clip": clip[0].config.hidden_size}
    head_shapes = {f"{enc}/{name}": (width, len(classes)) for enc, width in widths.items()
                   for name, classes in ATTRIBUTE_CLASSES.items()}
    heads = {name: 0.1 * jax.random.normal(key, shape) for key, (name, shape) in zip(keys, head_shapes.items())}
    params = {"t5": t5[1], "clip": clip[1], "heads": heads}

    def loss_fn(p, t5_ids, clip_ids, labels):
        txt, vec = encode_prompts(t5[0], p["t5"], clip[0], p["clip"], t5_ids, clip_ids, jnp.float32)
        features = {"t5": txt.mean(axis=1), "clip": vec}
        total = 0.0
        for enc, x in features.items():
            for i, name in enumerate(ATTRIBUTE_CLASSES):
                logits = x @ p["heads"][f"{enc}/{name}"]
                total += optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, i]).mean()
        return total

    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, t5_ids, clip_ids, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, t5_ids, clip_ids, labels)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    rng = np.random.default_rng(seed + 2)
    with tqdm(range(steps), desc="text encoders", unit="step", disable=not progress, mininterval=5) as bar:
        for i in bar:
            rows = rng.integers(len(captions), size=batch)
            params, opt, loss = step(params, opt, t5_ids[rows], clip_ids[rows], labels[rows])
            if i % 50 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return (t5[0], params["t5"]), (clip[0], params["clip"])


def readout_accuracy(tokenizer, t5, clip, seen: list[str], held_out: list[str]) -> dict[str, float]:
    """How linearly the trained encoders state the attributes: a least-squares linear readout
    (one-hot targets) of each attribute from T5's mean output and from CLIP's pooled vector,
    fitted on `seen` and scored on `held_out`; {"t5 color": fraction right, ...}. (The command's
    encoders learn the held-out captions' text too, so this checks their layout, not whether
    they generalise: 100% for every attribute; trained on seen captions only, T5 got 92.5% of
    colours.)"""
    out, feats = {}, {}
    for name, caps in (("seen", seen), ("held", held_out)):
        txt, vec = encode_captions(tokenizer, t5, clip, caps)
        feats[name] = {"t5": txt.mean(axis=1), "clip": vec}
    labels = {"seen": attribute_labels(seen), "held": attribute_labels(held_out)}
    for enc in ("t5", "clip"):
        x = np.concatenate([feats["seen"][enc], np.ones((len(seen), 1))], axis=1)
        xh = np.concatenate([feats["held"][enc], np.ones((len(held_out), 1))], axis=1)
        for i, (name, classes) in enumerate(ATTRIBUTE_CLASSES.items()):
            w = np.linalg.lstsq(x, np.eye(len(classes))[labels["seen"][:, i]], rcond=None)[0]
            out[f"{enc} {name}"] = float(np.mean((xh @ w).argmax(-1) == labels["held"][:, i]))
    return out


def encode_captions(tokenizer, t5, clip, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """txt (N, MAX_SEQUENCE_LENGTH, 64) and vec (N, 64) float32 of the captions, as the pipeline encodes them."""
    t5_ids, clip_ids = tokenizer(captions, MAX_SEQUENCE_LENGTH)
    txt, vec = encode_prompts_jit(t5[0], t5[1], clip[0], clip[1], t5_ids, clip_ids, jnp.float32)
    return np.asarray(txt), np.asarray(vec)


def text_separation(tokenizer, t5, clip) -> dict[str, float]:
    """How far apart the encoders put captions that swap their two colours, against captions that
    differ in one word, and against the same caption (0): relative L2 distances of T5's whole
    output (txt) and of CLIP's pooled vector (vec), averaged over every colour pair with a circle,
    centred. A swap must move the outputs about as much as a changed word, or the transformer
    cannot tell which colour goes where (FLUX gives every text token the RoPE position 0)."""
    colors = list(shapes.PALETTE)
    swaps, changes = [], []
    for a, b in itertools.combinations(colors, 2):
        c = next(x for x in colors if x not in (a, b))
        base = shapes.Caption(a, "circle", b).text
        swaps.append((base, shapes.Caption(b, "circle", a).text))
        changes.append((base, shapes.Caption(c, "circle", b).text))
    out = {}
    for name, pairs in (("swap", swaps), ("one word", changes)):
        txt, vec = encode_captions(tokenizer, t5, clip, [p for pair in pairs for p in pair])
        for what, x in (("txt", txt), ("vec", vec)):
            x = x.reshape(len(pairs), 2, -1)
            out[f"{what} {name}"] = float(np.mean(np.linalg.norm(x[:, 0] - x[:, 1], axis=-1)
                                                  / np.linalg.norm(x[:, 0], axis=-1)))
    return out


# -- the VAE --------------------------------------------------------------------------------------


def to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 in [-1, 1], as the VAE takes them."""
    return images.astype(np.float32) / 127.5 - 1.0


def random_windows(images: np.ndarray, rng: np.random.Generator, batch: int, side: int) -> np.ndarray:
    """`batch` windows (batch, side, side, 3) of randomly drawn `images`, at offsets that are multiples of
    8 px (the latent grid's), drawn uniformly."""
    n, size = len(images), images.shape[1]
    rows = rng.integers(n, size=batch)
    y, x = rng.integers(0, (size - side) // 8 + 1, size=(2, batch)) * 8
    return np.stack([images[r, i:i + side, j:j + side] for r, i, j in zip(rows, y, x)])


def edge_mask(x: jax.Array, threshold: float = 0.05) -> jax.Array:
    """(B, H, W, 1) float32: 1 where a pixel's 3x3 neighbourhood (edges repeated at the border) spans
    more than `threshold` in some channel of x (B, H, W, C) in [-1, 1], else 0: the shapes' outlines."""
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    window = (1, 3, 3, 1)
    high = jax.lax.reduce_window(pad, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), "VALID")
    low = -jax.lax.reduce_window(-pad, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), "VALID")
    return (jnp.max(high - low, axis=-1, keepdims=True) > threshold).astype(jnp.float32)


def train_vae(images: np.ndarray, steps: int, batch: int, lr: float, seed: int,
              progress: bool = True) -> tuple[AutoEncoderConfig, dict]:
    """Train VAE_CONFIG's AutoEncoder on `images` (N, SIZE, SIZE, 3) uint8; returns (config with the
    measured latent normalisation, float32 params).

    Each step takes `batch` random VAE_WINDOW-px windows (`random_windows`): the model is
    convolutional, and on this CPU a 64-px window costs a third of what a 128-px image does per
    pixel (0.34 against 1.0 s a step at 65k pixels a batch); its one attention layer, at 1/8
    resolution, generalises from 8x8 latents to the 16x16 of a whole image.

    Loss: absolute error of decode(posterior mean + noise) against the window, averaged with weight
    1 + VAE_EDGE_WEIGHT on the shapes' outlines (`edge_mask`) and 1 elsewhere.
    - The noise, VAE_LATENT_NOISE times the batch's latent std (no gradient through the std), makes
      the decoder draw clean images from nearby latents: the transformer's samples are never
      exact, and a decoder trained on exact latents only turned them into coloured speckle (a
      probe: 5% of shape colours right). It stands in for a VAE's posterior sample; a KL term
      is left out (with one, weight 1e-4, a probe still reconstructed with MSE 0.13 after 250
      steps) and the latent scale is fixed afterwards by the measured normalisation instead.
    - Absolute rather than squared error: on flat colours the error sits on the edges, and a
      squared error is content with blurred ones (a probe: after 600 steps triangles came back as
      round blobs, 56% of shapes right; with this loss 86-90% after 1200).
    - The edge weight: outlines are a few percent of the pixels, and with a plain mean the decoder
      drew triangles as stepped pyramids with flat tops (a probe: 29 of 33 held-out triangles
      right, fill ratio median 0.59, 90th percentile 0.65); weighted, 33 of 33 (0.58, 0.61).
    """
    from tqdm import tqdm

    model = AutoEncoder(VAE_CONFIG)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, VAE_WINDOW, VAE_WINDOW, 3)))["params"]
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 2), steps, lr * 0.05),
                     weight_decay=1e-4)
    opt = tx.init(params)

    def loss_fn(p, x, key):
        mean = model.apply({"params": p}, x, method=lambda m, x: jnp.split(m.encoder(x), 2, axis=-1)[0])
        noise = VAE_LATENT_NOISE * jax.lax.stop_gradient(jnp.std(mean)) * jax.random.normal(key, mean.shape)
        recon = model.apply({"params": p}, mean + noise, method=lambda m, z: m.decoder(z))
        weight = 1.0 + VAE_EDGE_WEIGHT * edge_mask(x)
        return jnp.mean(jnp.abs(recon.astype(jnp.float32) - x) * weight) / jnp.mean(weight)

    @jax.jit
    def step(p, opt, x, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed + 3), steps)
    with tqdm(range(steps), desc="VAE", unit="step", disable=not progress, mininterval=5) as bar:
        for i in bar:
            x = to_model_pixels(random_windows(images, rng, batch, VAE_WINDOW))
            params, opt, loss = step(params, opt, x, keys[i])
            if i % 50 == 0 or i == steps - 1:
                bar.set_postfix(l1=f"{float(loss):.4f}")
    means = np.concatenate([np.asarray(m) for m in _batched(lambda x: encoder_mean(model, params, x), images)])
    config = VAE_CONFIG.replace(shift_factor=float(means.mean()), scale_factor=float(1.0 / means.std()))
    return config, params


@jax.jit
def _encoder_mean(params, x):
    moments = AutoEncoder(VAE_CONFIG).apply({"params": params}, x, method=lambda m, x: m.encoder(x))
    return jnp.split(moments.astype(jnp.float32), 2, axis=-1)[0]


def encoder_mean(model, params, images: np.ndarray) -> jax.Array:
    """The posterior means (N, SIZE/8, SIZE/8, 16) of uint8 images, before normalisation."""
    del model  # the config's normalisation does not enter the encoder
    return _encoder_mean(params, to_model_pixels(images))


def _batched(fn, array: np.ndarray, size: int = 256):
    return [fn(array[i:i + size]) for i in range(0, len(array), size)]


def reconstruction_accuracy(vae_config, vae_params, seed: int, n: int = 64) -> dict[str, float]:
    """`shapes.accuracy` of decode(encode(image)) for n images of HELD_OUT captions (drawn for this
    check only): what the VAE leaves of each attribute, the ceiling of the whole model's accuracy."""
    captions, images = zip(*itertools.islice(shapes.examples(seed + 1, SIZE, shapes.HELD_OUT), n))
    model = AutoEncoder(vae_config)
    recon = jax.jit(lambda p, x: model.apply({"params": p}, model.apply({"params": p}, x, method="encode"),
                                              method="decode"))(vae_params, to_model_pixels(np.stack(images)))
    pixels = np.clip((np.asarray(recon) + 1.0) / 2.0, 0.0, 1.0)
    return shapes.accuracy(shapes.classify(im, c) for im, c in zip(pixels, captions))


# -- the transformer ------------------------------------------------------------------------------


def packed_latents(vae_config: AutoEncoderConfig, vae_params, images: np.ndarray) -> np.ndarray:
    """The normalised posterior-mean latents of `images`, packed as the transformer sees them:
    (N, (SIZE/16)^2, 64) float32 (AutoEncoder.encode, then sampling.pack)."""
    model = AutoEncoder(vae_config)
    encode = jax.jit(lambda p, x: sampling.pack(model.apply({"params": p}, x, method="encode").transpose(0, 3, 1, 2)))
    return np.concatenate([np.asarray(encode(vae_params, to_model_pixels(x))) for x in
                           (images[i:i + 256] for i in range(0, len(images), 256))])


def train_transformer(latents: np.ndarray, caption_index: np.ndarray, txt: np.ndarray, vec: np.ndarray,
                      cfg: TrainConfig, batch: int, seed: int, progress: bool = True):
    """Train a FLUX_CONFIG transformer with fluxjax.training.trainer's Trainer.

    latents: (N, L_img, 64) packed clean latents; caption_index: (N,) the row of txt (C, L, 64) and
    vec (C, 64) each latent's caption was encoded into. Batches are drawn uniformly from the pool
    with a NumPy generator seeded by `seed`. Returns (FluxConfig, the EMA params, or the params
    when cfg.ema_decay is None), stacked layout.
    """
    from tqdm import tqdm

    config = FluxConfig(in_channels=latents.shape[-1], out_channels=latents.shape[-1], vec_in_dim=vec.shape[-1],
                        context_in_dim=txt.shape[-1], **FLUX_CONFIG)
    model, params = random_component("transformer", config, "float32", seed=seed, attention_impl="xla")
    trainer = Trainer(model, cfg, SCHEDULE)
    state = trainer.init(params, seed)
    img_ids = sampling.image_ids(batch, SIZE, SIZE)
    txt_ids = sampling.text_ids(batch, txt.shape[1])
    rng = np.random.default_rng(seed)
    with tqdm(range(cfg.total_steps), desc="transformer", unit="step", disable=not progress, mininterval=5) as bar:
        running = None
        for i in bar:
            rows = rng.integers(len(latents), size=batch)
            caps = caption_index[rows]
            state, metrics = trainer.step(state, dict(latents=latents[rows], img_ids=img_ids, txt=txt[caps],
                                                      txt_ids=txt_ids, vec=vec[caps]))
            if i % 25 == 0 or i == cfg.total_steps - 1:
                loss = float(metrics["loss"])
                running = loss if running is None else 0.8 * running + 0.2 * loss
                bar.set_postfix(loss=f"{running:.4f}")
    return config, state.ema if state.ema is not None else state.params


# -- the folder -----------------------------------------------------------------------------------


def _write_component(folder: str, kind: str, config, params) -> None:
    os.makedirs(folder)
    write_marker(folder, kind, config, STORED_DTYPE)
    save_params(os.path.join(folder, PARAMS), jax.tree.map(lambda p: np.asarray(p, STORED_DTYPE), params))


def write_folder(out: str, tokenizer_root: str, components: dict, defaults: dict, info: dict) -> None:
    """The hub-layout folder at `out`, written as `out`.partial and renamed into place (an existing
    `out` is replaced only once the new folder is complete).

    components: hub folder name -> (fluxjax kind, config, params).
    """
    out = os.path.abspath(out)
    tmp, old = f"{out}.partial", f"{out}.old"
    for path in (tmp, old):
        if os.path.lexists(path):
            shutil.rmtree(path)
    os.makedirs(tmp)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(tokenizer_root, name), os.path.join(tmp, name))
    for name, (kind, config, params) in components.items():
        _write_component(os.path.join(tmp, name), kind, config, params)
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "use_dynamic_shifting": SCHEDULE.use_dynamic_shifting, "shift": SCHEDULE.shift}, f, indent=2)
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "fluxjax_shapes": info}
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "defaults.json"), "w") as f:
        json.dump(defaults, f, indent=2)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    if os.path.exists(old):
        shutil.rmtree(old)


def folder_bytes(path: str) -> int:
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fluxjax.shapes.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="every random draw comes from it (default 0)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"),
                   help="the hub-layout folder to write (default fluxjax/shapes/weights)")
    p.add_argument("--images", type=int, default=4096, help="drawn images in the training pool (default 4096)")
    p.add_argument("--text-steps", type=int, default=800, help="text-encoder updates (default 800)")
    p.add_argument("--vae-steps", type=int, default=1200, help="VAE updates (default 1200)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=7500, help="transformer updates (default 7500)")
    p.add_argument("--batch", type=int, default=32, help="transformer batch (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="transformer peak learning rate (default 1e-3)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (default 0.999)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    progress = not args.quiet

    # the pool: SEEN combinations only, every position; images drawn once, reused by both stages
    captions, images = zip(*itertools.islice(shapes.examples(args.seed, SIZE, shapes.SEEN), args.images))
    images = np.stack(images)
    assert not any(shapes.is_held_out(c) for c in captions)
    print(f"pool: {len(images)} images of {SIZE}x{SIZE} ({time.perf_counter() - start:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tokenizer_root:
        make_tokenizers(tokenizer_root, tokenizer_corpus())
        tokenizer = PromptTokenizer.from_folder(tokenizer_root)
        t5, clip = text_encoders(tokenizer, args.seed)
        text_start = time.perf_counter()
        every = shapes.all_captions()
        seen = [c for c in every if not shapes.is_held_out(c)]
        held_out = [c for c in every if shapes.is_held_out(c)]
        # text only: every caption of the grammar, held-out ones included (see train_text_encoders)
        t5, clip = train_text_encoders(tokenizer, t5, clip, every, args.text_steps, args.seed, progress=progress)
        sep = text_separation(tokenizer, t5, clip)
        readout = readout_accuracy(tokenizer, t5, clip, seen, held_out)
        print(f"text encoders: {time.perf_counter() - text_start:.0f} s; relative distance, swapped colours vs one "
              "word changed: " + ", ".join(f"{k} {v:.3f}" for k, v in sep.items()), flush=True)
        print("  linear readout of held-out captions' attributes: "
              + ", ".join(f"{k} {v:.0%}" for k, v in readout.items()), flush=True)
        vocabulary = sorted(set(captions))
        txt, vec = encode_captions(tokenizer, t5, clip, vocabulary)
        caption_index = np.array([vocabulary.index(c) for c in captions])

        vae_start = time.perf_counter()
        vae_config, vae_params = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, progress)
        print(f"VAE: {time.perf_counter() - vae_start:.0f} s; latent shift {vae_config.shift_factor:.4f}, "
              f"scale {vae_config.scale_factor:.4f}", flush=True)
        latents = packed_latents(vae_config, vae_params, images)
        print("VAE reconstructions of held-out captions, accuracy: " + ", ".join(
            f"{k} {v:.0%}" for k, v in reconstruction_accuracy(vae_config, vae_params, args.seed).items()), flush=True)

        flux_start = time.perf_counter()
        cfg = TrainConfig(learning_rate=args.lr, warmup_steps=min(200, args.steps // 2), total_steps=args.steps,
                          final_lr_fraction=0.05, weight_decay=1e-4, clip_norm=1.0, ema_decay=args.ema,
                          compute_dtype="float32")
        flux_config, flux_params = train_transformer(latents, caption_index, txt, vec, cfg, args.batch, args.seed,
                                                     progress)
        print(f"transformer: {time.perf_counter() - flux_start:.0f} s", flush=True)

        wall = time.perf_counter() - start
        info = {"command": "python -m fluxjax.shapes.recipe " + " ".join(argv if argv is not None else
                                                                          __import__("sys").argv[1:]),
                "seed": args.seed, "wall_seconds": round(wall), "text_separation": sep,
                "text_readout_held_out": readout}
        defaults = {"height": SIZE, "width": SIZE, "num_steps": NUM_STEPS, "guidance": None,
                    "max_sequence_length": MAX_SEQUENCE_LENGTH}
        write_folder(args.out, tokenizer_root,
                     {"transformer": ("flux", flux_config, flux_params), "vae": ("vae", vae_config, vae_params),
                      "text_encoder": ("clip", clip[0].config, clip[1]),
                      "text_encoder_2": ("t5", t5[0].config, t5[1])},
                     defaults, info)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 2**20:.2f} MB); total wall time {wall / 60:.1f} min",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
