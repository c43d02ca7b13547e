"""`fluxjax train --lora-rank` on a FLUX.2 [klein] base folder (test_flux2_pipeline's tiny one):
the cached data are the FLUX.2 VAE's tokens and the stacked Qwen3 states the pipeline itself
makes, a few steps lower the rectified-flow loss, and the LoRA written loads in diffusers'
Flux2KleinPipeline with the same pixels as fluxjax's with it (float32, same latents, 1e-3).
"""

from __future__ import annotations

import copy
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from fluxjax.commands import cli
from fluxjax.pipeline import flux2
from fluxjax.training.data import EncodedDataset, load_pixels, scan_folder
from fluxjax.training.trainer import LORA_FILE, TrainConfig, Trainer
from test_flux2_pipeline import LENGTH, PIXEL_TOL, PROMPTS, _latents, klein  # noqa: F401

SIZE, STEPS, RANK, LR = 32, 8, 4, 0.1
pytestmark = pytest.mark.parametrize("klein", ["base"], indirect=True)  # diffusers' klein LoRA trainer's base


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 32x32 images with captions."""
    folder = tmp_path_factory.mktemp("flux2_train_data")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        y, x = np.mgrid[:SIZE, :SIZE]
        image = np.stack([x * 8 + 40 * i, y * 8, (x + y) * 4], -1) % 256 + rng.integers(0, 16, (SIZE, SIZE, 3))
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def _config():
    return TrainConfig(learning_rate=LR, total_steps=STEPS, weight_decay=0.0, clip_norm=None, param_dtype="float32",
                       compute_dtype="float32", lora_rank=RANK)


def _train(klein, data, out):
    args = ["train", str(data), "--out", str(out), "--model", str(klein.root), "--steps", str(STEPS),
            "--batch-size", "2", "--lr", str(LR), "--weight-decay", "0", "--clip-norm", "0", "--dtype", "float32",
            "--resolution", str(SIZE), "--max-sequence-length", str(LENGTH), "--lora-rank", str(RANK)]
    assert cli.main(args) == 0
    return os.path.join(out, LORA_FILE)


def test_lora_training_on_klein_base(klein, data, tmp_path):  # noqa: F811
    path = _train(klein, data, tmp_path / "run")
    pipe = klein.pipe
    # The run's cache (read back, not computed again): the FLUX.2 VAE's normalised tokens (L, 128)
    # as the pipeline encodes an image, its stacked Qwen3 states, 4 id columns, no pooled vector.
    dataset = EncodedDataset(scan_folder(data), pipe, SIZE, LENGTH, tmp_path / "run" / "cache")
    assert dataset.computed == 0
    batch = dataset.batch([0, 1])
    assert sorted(batch) == ["empty_txt", "img_ids", "latents", "txt", "txt_ids"]
    pixels = np.stack([load_pixels(str(data / f"{i}.png"), SIZE, SIZE) for i in range(2)])
    assert batch["latents"].shape == (2, (SIZE // 16) ** 2, 128)
    np.testing.assert_allclose(batch["latents"], flux2.encode_tokens(pipe.vae.model, pipe.vae.params, pixels),
                               atol=1e-5)
    for txt, prompt in zip([*batch["txt"], batch["empty_txt"][0]], PROMPTS + [""]):
        np.testing.assert_allclose(txt, pipe.encode([prompt], LENGTH)[0], atol=1e-6)
    np.testing.assert_array_equal(batch["img_ids"], flux2.position_ids(2, SIZE // 16, SIZE // 16))
    np.testing.assert_array_equal(batch["txt_ids"], flux2.text_ids(2, LENGTH))

    # The loss on the training batch at fixed noise and timesteps, before and after.
    trainer = Trainer(pipe.transformer.model, _config(), pipe.schedule)
    start = trainer.init(pipe.transformer.params, seed=0)  # the run's seed: its initial LoRA
    state = trainer.restore(tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}", pipe.transformer.params)
    loss = jax.jit(trainer.loss)
    keys = jax.random.split(jax.random.key(1), 8)
    before, after = (np.mean([float(loss(s.params, batch, k, trainer.frozen)) for k in keys]) for s in (start, state))
    print(f"loss at fixed noise before {before:.4f}, after {STEPS} steps {after:.4f}")
    assert after < 0.9 * before  # measured 0.81 of it

    # The written LoRA in diffusers (its own loader) and in fluxjax, no CFG to keep the run short.
    klein.ref.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="trained")
    try:
        with torch.no_grad():
            theirs = klein.ref(prompt=PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.0,
                               latents=_latents(1, SIZE, SIZE), max_sequence_length=LENGTH, output_type="np").images
    finally:
        klein.ref.unload_lora_weights()
    run = lambda p: p(PROMPTS[0], SIZE, SIZE, num_steps=2, latents=_latents(1, SIZE, SIZE).numpy(),  # noqa: E731
                      max_sequence_length=LENGTH, true_cfg_scale=1.0, output="np")
    with_lora = copy.copy(pipe)
    with_lora.load_lora(path, fuse=True)
    ours, base = run(with_lora), run(pipe)
    err = float(np.abs(ours - theirs).max())
    print(f"trained LoRA: max |pixel error| vs diffusers {err:.2e}; moves the pixels by {np.abs(ours - base).max():.3f}")
    assert np.abs(ours - base).max() > 1e-2  # the LoRA learnt something visible
    assert err < PIXEL_TOL


def test_full_fine_tuning_refused_before_loading(klein, data, tmp_path, capsys):  # noqa: F811
    assert cli.main(["train", str(data), "--out", str(tmp_path / "run"), "--model", str(klein.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FLUX.2" in err[0] and "--lora-rank" in err[0], err
    assert not (tmp_path / "run").exists()
