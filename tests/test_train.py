"""Training (fluxjax.training.trainer): the loss's gradient against diffusers' FluxTransformer2DModel, the
jitted step (optax, EMA, remat, dtypes), sharding on 8 simulated CPU devices, checkpoints."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from conftest import rel_err
from test_transformer import CONFIGS, flux_args, make_inputs

from fluxjax.lora import adapters as lora, fused as lora_fused, trainable
from fluxjax.config import FluxConfig
from fluxjax.errors import UsageError
from fluxjax.loading.registry import load_transformer
from fluxjax.models.flux import param_shapes
from fluxjax.models.flux import Flux
from fluxjax.pipeline.pipeline import FluxPipeline
from fluxjax.loading.random_weights import host_random_params
from fluxjax.testing.reference import randomize_
from fluxjax.sampling.sampler import Schedule
from fluxjax.training.trainer import (
    Trainer, TrainConfig, ema_decay, flow_matching_loss, latest_checkpoint, restore_state, sample_timesteps, save_state,
)

# Per leaf, max |fluxjax - diffusers| / max |diffusers|: what the issue asks (fp32). Measured: the
# worst leaf is dev_like's guidance_in/in_layer/kernel at 9.1e-5 (its gradient is the sinusoidal
# embedding of guidance * 1000, arguments up to 3500, which the two implementations round
# differently in float32); every other leaf is below 2.2e-5, the median 7.6e-6.
GRAD_TOL = 1e-4


# dev-like (guidance embedding) and schnell-like (none), both with 64 latent channels in and out
GRAD_CONFIGS = {"dev_like": CONFIGS["dev_like"],
                "schnell_like": {**CONFIGS["schnell_like"], "in_channels": 64, "out_channels": None}}


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradient_matches_diffusers(name, tmp_path):
    """Same weights, x0, eps, t and text: d loss / d params of fluxjax equals diffusers' autograd.

    diffusers' gradients are saved as a transformer checkpoint and read by fluxjax's own loader:
    the key map is a re-layout (transpose, concatenation, permutation) of each tensor, so it maps
    a gradient exactly as it maps the weight.
    """
    cfg = GRAD_CONFIGS[name]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg)
    randomize_(model, seed=3)
    model.save_pretrained(tmp_path / "transformer")
    inputs = make_inputs(cfg)
    x0 = inputs["hidden_states"]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    tb = inputs["timestep"][:, None, None]
    out = model(**{**inputs, "hidden_states": (1 - tb) * x0 + tb * eps}).sample
    torch.mean((out - (eps - x0)) ** 2).backward()
    grads = {k: p.grad.detach().contiguous() for k, p in model.named_parameters()}
    assert set(grads) == set(model.state_dict()) and all(g.abs().max() > 0 for g in grads.values())
    (tmp_path / "grads").mkdir()
    shutil.copy(tmp_path / "transformer" / "config.json", tmp_path / "grads" / "config.json")
    save_file(grads, str(tmp_path / "grads" / "diffusion_pytorch_model.safetensors"))
    _, want = load_transformer(tmp_path / "grads")

    flux, params = load_transformer(tmp_path / "transformer", attention_impl="xla")
    x0_j, img_ids, txt, txt_ids, t, vec, guidance = flux_args(inputs)
    eps_j = jnp.asarray(eps.numpy())
    loss = lambda p: flow_matching_loss(flux, p, x0_j, eps_j, t, img_ids, txt, txt_ids, vec, guidance)  # noqa: E731
    got = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    errors = {jax.tree_util.keystr(k): rel_err(g, w) for (k, g), w in
              zip(jax.tree.flatten_with_path(got)[0], jax.tree.leaves(want))}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])


# -- the step on the tiny preset ----------------------------------------------------------------

GRID, L_TXT, BATCH = (4, 4), 6, 2


def tiny_batch(cfg: FluxConfig, batch: int = BATCH, seed: int = 0) -> dict:
    """A host batch for `Trainer.step` (see its docstring), random but fixed."""
    rng = np.random.default_rng(seed)
    rows, cols = GRID
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(rows)[:, None], np.arange(cols)[None]
    return {
        "latents": rng.standard_normal((batch, rows * cols, cfg.in_channels)).astype(np.float32),
        "img_ids": np.broadcast_to(ids.reshape(1, -1, 3), (batch, rows * cols, 3)).copy(),
        "txt": rng.standard_normal((batch, L_TXT, cfg.context_in_dim)).astype(np.float32),
        "txt_ids": np.zeros((batch, L_TXT, 3), np.float32),
        "vec": rng.standard_normal((batch, cfg.vec_in_dim)).astype(np.float32),
        "empty_txt": rng.standard_normal((1, L_TXT, cfg.context_in_dim)).astype(np.float32),
        "empty_vec": rng.standard_normal((1, cfg.vec_in_dim)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def tiny():
    cfg = FluxConfig.preset("tiny")
    model = Flux(cfg)
    params = host_random_params(param_shapes(model), seed=0, neutral_vectors=True)
    return model, params, tiny_batch(cfg)


def test_timesteps_are_logit_normal_shifted_by_the_samplers_rule():
    schedule = Schedule.dev()
    key = jax.random.key(0)
    t = sample_timesteps(key, 10_000, 1024, schedule, mean=0.5, std=0.8)
    plain = jax.nn.sigmoid(0.5 + 0.8 * jax.random.normal(key, (10_000,)))
    np.testing.assert_allclose(t, schedule.shift_timesteps(plain, 1024), rtol=1e-6)
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert float(jnp.median(t)) > float(jnp.median(plain))  # dev's shift moves t towards noise


@pytest.fixture(scope="module")
def ema_trainer(tiny):
    """One Trainer (one compiled step) for the tests that step the tiny model with EMA."""
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=40, ema_decay=0.9, compute_dtype="float32")
    return Trainer(tiny[0], cfg, Schedule.dev())


def test_loss_goes_down_and_ema_follows(tiny, ema_trainer):
    model, params, batch = tiny
    trainer = ema_trainer
    state = trainer.init(params, seed=0)
    losses = []
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    p, e = state.params["img_in"]["kernel"], state.ema["img_in"]["kernel"]
    p0 = params["img_in"]["kernel"]
    assert 0 < float(jnp.abs(e - p0).max()) and float(jnp.abs(e - p).max()) > 0  # the EMA lags the weights


def test_ema_warms_up_from_the_first_step(tiny, ema_trainer):
    """Update i averages with decay min(0.9, (1 + i) / (10 + i)): 0.1, then 2/11, so after two
    updates the EMA is mostly the new weights rather than the random start; late in a long run
    the configured decay holds."""
    model, params, batch = tiny
    kernel = lambda tree: np.asarray(tree["img_in"]["kernel"])  # noqa: E731  (copied: the step donates its state)
    state, _ = ema_trainer.step(ema_trainer.init(params, seed=0), batch)
    p0, p1, ema1 = kernel(params), kernel(state.params), kernel(state.ema)
    state, _ = ema_trainer.step(state, batch)
    p2, ema2 = kernel(state.params), kernel(state.ema)
    e1 = 0.1 * p0 + 0.9 * p1
    np.testing.assert_allclose(ema1, e1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ema2, (2 / 11) * e1 + (9 / 11) * p2, rtol=0, atol=1e-6)
    assert float(np.abs(p2 - p0).max()) > 1e-4  # the weights did move (the first step's rate is 0 in warmup)
    assert float(ema_decay(0.999, 10**6)) == np.float32(0.999) and float(ema_decay(0.999, 0)) == np.float32(0.1)


@pytest.mark.slow
def test_remat_and_dtypes_and_pluggable_optimizer(tiny):
    model, params, batch = tiny
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(3)
    grads = {}
    for remat in (False, True):
        trainer = Trainer(model, TrainConfig(remat=remat, compute_dtype="float32", caption_dropout=0.5), Schedule.dev())
        grads[remat] = jax.jit(jax.grad(trainer.loss))(params, batch, key)
    for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
        assert rel_err(b, a) <= 1e-6  # recomputation changes memory, not the gradient

    sgd = Trainer(model, TrainConfig(param_dtype="bfloat16"), Schedule.dev(), tx=optax.sgd(1e-2))
    state = sgd.init(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    state, metrics = sgd.step(state, batch)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params)) and np.isfinite(float(metrics["loss"]))


# -- data, the command, checkpoints and resume --------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def make_folder(root, sizes=((40, 24), (24, 40), (32, 32), (40, 24)), captions=True):
    """Images of random pixels with captions; returns the folder."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        if captions:
            (root / f"img{i}.txt").write_text(f"a picture number {i}")
    return root


def run_cli(capsys, *argv):
    from fluxjax.commands.cli import main

    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


def test_bad_data_is_named_in_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, tmp_path / "empty", "--out", out)
    assert code == 2 and "no images" in err and "\n" not in err

    folder = make_folder(tmp_path / "nocap")
    (folder / "img2.txt").unlink()
    code, err = run_cli(capsys, folder, "--out", out)
    assert code == 2 and "img2.png: no caption" in err and "\n" not in err

    folder = make_folder(tmp_path / "broken")
    (folder / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, err = run_cli(capsys, folder, "--out", out)
    assert code == 2 and "img1.png: unreadable image" in err and "\n" not in err

    folder = make_folder(tmp_path / "small", sizes=((40, 24), (40, 8)))
    code, err = run_cli(capsys, folder, "--out", out)
    assert code == 2 and "img1.png: 40x8 pixels" in err and "\n" not in err
    assert not out.exists()  # nothing ran


def test_metadata_jsonl_buckets_and_deterministic_order(tmp_path):
    from fluxjax.training.data import Batches, bucket, scan_folder

    folder = make_folder(tmp_path / "meta", captions=False)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": f"c{i}"}) + "\n" for i in range(4)))
    examples = scan_folder(folder)
    assert [e.caption for e in examples] == ["c0", "c1", "c2", "c3"]
    assert bucket(40, 24, 32) == (48, 32) and bucket(24, 40, 32) == (32, 48) and bucket(1000, 10, 32) == (320, 16)
    buckets = [bucket(e.width, e.height, 32) for e in examples]
    order = Batches(buckets, 2, seed=5)
    assert order.per_epoch == 1  # only the two 40x24 images make a full batch of 2
    assert [order.indices(i) for i in range(4)] == [Batches(buckets, 2, seed=5).indices(i) for i in range(4)]
    assert sorted(order.indices(0)) == [0, 3]
    assert len({tuple(Batches(buckets, 1, seed=s).indices(0) + Batches(buckets, 1, seed=s).indices(1)) for s in range(8)}) > 1
    with pytest.raises(Exception, match="no aspect bucket has that many"):
        Batches(buckets, 3, seed=0)


def test_training_images_are_read_as_generate_reads_them(tmp_path):
    """N17, N22 in training: the one reader (images.read_image), so a 16-bit image is not white and
    an EXIF-rotated JPEG is upright."""
    import bad_images

    from fluxjax.pipeline import conditioning
    from fluxjax.training.data import load_pixels, scan_folder

    files = bad_images.make(tmp_path / "data")
    for name in ("g16", "exif6"):
        open(os.path.splitext(files[name])[0] + ".txt", "w").write("a caption")
    for name in ("ok", "trunc", "corrupt", "fifo"):
        os.remove(files[name])
    assert [(os.path.basename(e.path), e.width, e.height) for e in scan_folder(tmp_path / "data")] == [
        ("exif6.jpg", 48, 32), ("g16.png", 48, 32)]
    for name in ("g16", "exif6"):
        want = conditioning.load_image(files[name]).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(load_pixels(files[name], 48, 32), want)


def test_a_fifo_among_the_images_is_refused_not_opened(tmp_path):
    """N103: opening a FIFO blocks forever; it is refused by its stat, in one line (a subprocess
    with a timeout, so that a regression fails instead of hanging)."""
    folder = make_folder(tmp_path / "data")
    os.mkfifo(folder / "img4.png")
    (folder / "img4.txt").write_text("a pipe")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "fluxjax.commands.cli", "train", str(folder), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"fluxjax train: error: {folder / 'img4.png'}: is a FIFO (named pipe), not a regular file; refusing to open it"]
    assert not (tmp_path / "out").exists()


def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """N100, N101: a Latin-1 caption file or metadata.jsonl is named, with the line and byte."""
    from fluxjax.training.data import scan_folder

    folder = make_folder(tmp_path / "captions")
    (folder / "img1.txt").write_bytes("a caf\xe9 in the sun".encode("latin-1"))
    with pytest.raises(UsageError) as e:
        scan_folder(folder)
    assert str(e.value) == f"{folder / 'img1.txt'}:1: not valid UTF-8 text (byte 0xe9 at column 6); save the file as UTF-8"
    folder = make_folder(tmp_path / "meta", captions=False)
    lines = [json.dumps({"file_name": f"img{i}.png", "text": f"caf\xe9 {i}"}, ensure_ascii=False) for i in range(4)]
    (folder / "metadata.jsonl").write_bytes(("\n".join(lines[:1]) + "\n").encode() + "\n".join(lines[1:]).encode("latin-1"))
    with pytest.raises(UsageError) as e:
        scan_folder(folder)
    assert str(e.value) == (f"{folder / 'metadata.jsonl'}:2: not valid UTF-8 text (byte 0xe9 at column 39); "
                            "save the file as UTF-8")


@pytest.fixture(scope="module")
def tiny_pipe():
    from fluxjax.pipeline.pipeline import FluxPipeline

    return FluxPipeline.from_pretrained("tiny", dtype="float32")


def test_cache_is_reused_and_invalidated(tmp_path, tiny_pipe):
    from fluxjax.training.data import EncodedDataset, scan_folder

    folder = make_folder(tmp_path / "data")
    kw = dict(pipe=tiny_pipe, resolution=32, max_sequence_length=16, cache_dir=tmp_path / "cache")
    first = EncodedDataset(scan_folder(folder), **kw)
    assert first.computed == 4 + 1  # four examples and the empty prompt
    batch = first.batch([0, 3])
    assert batch["latents"].shape == (2, 6, 64) and batch["txt"].shape == (2, 16, 32)
    assert EncodedDataset(scan_folder(folder), **kw).computed == 0
    (folder / "img1.txt").write_text("another caption")
    assert EncodedDataset(scan_folder(folder), **kw).computed == 1
    assert EncodedDataset(scan_folder(folder), **{**kw, "resolution": 48}).computed == 4  # new buckets


def test_checkpoint_round_trip_is_exact(tmp_path, tiny, ema_trainer):
    model, params, batch = tiny
    trainer = ema_trainer
    state, _ = trainer.step(trainer.init(params, seed=2), batch)
    save_state(tmp_path / "ck" / "step_00000001", state)
    assert latest_checkpoint(tmp_path / "ck").endswith("step_00000001")
    back = restore_state(tmp_path / "ck" / "step_00000001", trainer.abstract_state(params))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(state) == jax.tree.structure(back)


def _cli(*argv) -> list[str]:
    import sys

    return [sys.executable, "-m", "fluxjax.commands.cli", "train", *map(str, argv)]


def _final_state(out) -> list[np.ndarray]:
    import orbax.checkpoint.experimental.v1 as ocp

    from fluxjax.training.trainer import latest_checkpoint as latest

    return [np.asarray(x) for x in jax.tree.leaves(ocp.load(latest(out / "checkpoints")))]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_and_model_loads(tmp_path):
    """A run killed (SIGKILL) between checkpoints and resumed ends with the state of an
    uninterrupted run, bit for bit; the loss goes down; model/ is what FluxPipeline loads."""
    import signal
    import subprocess
    import time

    folder = make_folder(tmp_path / "data", sizes=((40, 24),) * 4)  # one bucket: one compile per run
    # One persistent compilation cache for the three runs: the first compiles, the others load its executables.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
               FLUXJAX_COMPILATION_CACHE=str(tmp_path / "xla"))
    common = [folder, "--resolution", "32", "--steps", "60", "--save-every", "20", "--lr", "3e-3", "--dtype", "float32",
              "--warmup", "5", "--ema", "0.9", "--caption-dropout", "0.2", "--seed", "3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_cli(*common, "--out", whole), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cli(*common, "--out", cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = cut / "loss.csv"
    killed_at = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        rows = csv.read_text().splitlines()[1:] if csv.exists() else []
        if rows and int(rows[-1].split(",")[0]) >= 22 and (cut / "checkpoints" / "step_00000020").is_dir():
            proc.send_signal(signal.SIGKILL)
            killed_at = int(rows[-1].split(",")[0])
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at < 40 and not (cut / "checkpoints" / "step_00000060").exists()
    subprocess.run(_cli(*common, "--out", cut, "--resume"), check=True, env=env, capture_output=True, timeout=600)

    for a, b in zip(_final_state(whole), _final_state(cut)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert (whole / "loss.csv").read_text() == (cut / "loss.csv").read_text()
    assert (whole / "loss.png").stat().st_size > 1000
    losses = np.loadtxt(whole / "loss.csv", delimiter=",", skiprows=1)[:, 1]
    assert losses[-15:].mean() < 0.8 * losses[:15].mean()

    from fluxjax.pipeline.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(whole / "model", dtype="float32")
    trained = pipe.transformer.params
    restored = _final_state(whole)
    assert any(np.array_equal(np.asarray(trained["img_in"]["kernel"]), r) for r in restored)
    image = pipe("a picture number 1", height=32, width=48, num_steps=2, output="np")
    assert image.shape == (1, 32, 48, 3) and np.isfinite(image).all()


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path, capsys, tiny):
    model, params, batch = tiny
    trainer = Trainer(model, TrainConfig(compute_dtype="float32"), Schedule.dev())
    save_state(tmp_path / "out" / "checkpoints" / "step_00000001", trainer.init(params))
    code, err = run_cli(capsys, make_folder(tmp_path / "data"), "--out", tmp_path / "out")
    assert code == 2 and "holds checkpoints of a run; pass --resume" in err


# -- LoRA training --------------------------------------------------------------------------------


def lora_trainer(model, lr=1e-2, steps=40, **kw):
    cfg = TrainConfig(learning_rate=lr, total_steps=steps, compute_dtype="float32", lora_rank=4, lora_alpha=8.0, **kw)
    return Trainer(model, cfg, Schedule.dev())


def test_lora_trains_only_the_adapters_and_the_loss_goes_down(tiny):
    """The state holds the LoRA's a/b factors only: the frozen base weights get no gradient and
    no optimizer state, and stay as they were; the loss falls on a fixed batch."""
    model, params, batch = tiny
    trainer = lora_trainer(model, ema_decay=0.9)
    state = trainer.init(params, seed=0)
    factors = {jax.tree_util.keystr(k) for k, _ in jax.tree.flatten_with_path(state.params)[0]}
    assert len(factors) == 2 * len(trainable.DEFAULT_TRAIN_TARGETS) and all(k.endswith(("['a']", "['b']")) for k in factors)
    adapter_size = sum(x.size for x in jax.tree.leaves(state.params))
    assert adapter_size < 0.1 * sum(x.size for x in jax.tree.leaves(params))
    # Adam's two moments and a step count: nothing the size of a base weight.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * adapter_size + 8
    losses = []
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    base = trainer.frozen[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)))
    assert float(jnp.abs(state.ema["single_blocks"]["linear1"]["b"]).max()) > 0


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """test_lora's diffusers-side tiny dev pipeline (saved hub folder, fluxjax pipe, noise, base images)."""
    from test_lora import hub as lora_hub

    return lora_hub.__wrapped__(tmp_path_factory)


@pytest.mark.slow
def test_trained_lora_gives_diffusers_the_same_image(hub):
    """A LoRA trained 3 steps by fluxjax, saved in the diffusers/PEFT layout: diffusers'
    load_lora_weights and fluxjax's own loader read it back and give the same
    pixels on the same noise (<= 1e-3, fp32, as test_lora's files; measured 6.0e-6, the LoRA
    moving diffusers' pixels by 0.21); the file read back by fluxjax
    is the trained adapter (its fused weights equal fusing the trained tree directly)."""
    from test_lora import check, run_ours, run_reference

    from fluxjax.training.trainer import write_lora

    t = hub.pipe.transformer
    params = t.params
    trainer = Trainer(t.model, TrainConfig(learning_rate=3e-2, total_steps=3, compute_dtype="float32", lora_rank=4,
                                           lora_alpha=2.0, guidance=3.5), Schedule.dev())
    state = trainer.init(params, seed=1)
    batch = tiny_batch(t.model.config, seed=4)
    for _ in range(3):
        state, _ = trainer.step(state, batch)
    path = str(hub.dir / "trained.safetensors")
    write_lora(path, trainer, state.params)
    assert lora.read_lora_file(path, t.model.config)[0] == "diffusers"

    # Live and fused give the same pixels for any diffusers file (tests/test_lora.py): fused here.
    theirs = run_reference(hub.reference, hub.noise, [(path, 1.0)])
    fused = FluxPipeline.from_pretrained(hub.root, dtype="float32", loras=[(path, 1.0)], fuse=True)
    check(run_ours(fused, hub.noise), theirs, hub.base)

    trained = lora.Adapters(trainable.join_factors(jax.tree.map(np.asarray, state.params), trainer.fixed), names=("t",))
    want = lora_fused.fuse(params, trained, [1.0])
    got = fused.transformer.params
    assert max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))) <= 1e-6


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_writes_a_file_fluxjax_loads(tmp_path, capsys, tiny_pipe):
    """`fluxjax train --lora-rank`: checkpoints hold the adapters' state; a run resumed from its
    step-2 checkpoint ends bit-identical to the uninterrupted run (state and lora.safetensors);
    the file is the diffusers layout and fluxjax's pipeline loads it."""
    import orbax.checkpoint.experimental.v1 as ocp

    folder = make_folder(tmp_path / "data", sizes=((40, 24),) * 2)
    out = tmp_path / "out"
    argv = [folder, "--out", out, "--resolution", "32", "--steps", "4", "--save-every", "2", "--lr", "1e-2",
            "--dtype", "float32", "--lora-rank", "2", "--lora-alpha", "4", "--max-sequence-length", "16"]
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    done = [np.asarray(x) for x in jax.tree.leaves(ocp.load(latest_checkpoint(out / "checkpoints")))]
    assert sum(x.size for x in done) < 0.2 * sum(np.size(x) for x in jax.tree.leaves(tiny_pipe.transformer.params))
    written = (out / "lora.safetensors").read_bytes()
    assert not (out / "model").exists()

    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "lora.safetensors").unlink()
    code, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    again = [np.asarray(x) for x in jax.tree.leaves(ocp.load(latest_checkpoint(out / "checkpoints")))]
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(done, again))
    # The same tensors bit for bit and the same metadata: not the same bytes, since safetensors
    # writes its metadata map in a random order (a Rust HashMap), so the header's key order varies.
    assert _safetensors_contents((out / "lora.safetensors").read_bytes()) == _safetensors_contents(written)

    cfg = tiny_pipe.transformer.model.config
    assert lora.read_lora_file(str(out / "lora.safetensors"), cfg)[0] == "diffusers"
    pipe = FluxPipeline.from_pretrained("tiny", dtype="float32", loras=[(str(out / "lora.safetensors"), 1.0)])
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(pipe.transformer.params), jax.tree.leaves(tiny_pipe.transformer.params))]
    assert max(moved) > 0  # the trained LoRA changes the weights it was fused into


def _safetensors_contents(data: bytes) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape, raw bytes)}) of a safetensors file's bytes."""
    from safetensors.numpy import load

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    tensors = {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in load(data).items()}
    return header.get("__metadata__", {}), tensors


# -- --out: the folder rule of fluxjax.files, --resume's settings and damaged checkpoints (issue 31) --


def _train_error(capsys, *argv) -> str:
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "\n" not in err and err.startswith("fluxjax train: error: "), err
    return err[len("fluxjax train: error: "):]


def test_out_not_written_by_fluxjax_train_is_refused_before_loading(tmp_path, capsys):
    """N118-N120 (and N109): the user's folder, their lora.safetensors, a model/ link, a file in
    the way, a NaN rate: one line, exit 2, before the model loads; every file of theirs, at every
    depth, is as it was and no lock file is left."""
    from test_convert import tree_bytes

    from fluxjax.training.trainer import _write_run_marker

    data = make_folder(tmp_path / "data", sizes=((40, 24),))
    proj = tmp_path / "proj"
    (proj / "model").mkdir(parents=True)
    (proj / "notes").mkdir()
    (proj / "model" / "README.md").write_text("notes")
    (proj / "loss.csv").write_text("log")
    lproj = tmp_path / "lproj"
    lproj.mkdir()
    (lproj / "lora.safetensors").write_bytes(b"the user's LoRA")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.txt").write_text("mine")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(tmp_path / "elsewhere", linked / "model")
    owned = tmp_path / "owned"  # a run of fluxjax train's whose model/ became a link
    owned.mkdir()
    _write_run_marker(str(owned), None)
    os.symlink(tmp_path / "elsewhere", owned / "model")
    (tmp_path / "afile").write_text("a file")
    not_train = "already exists and was not written by fluxjax train ({}); fluxjax train writes into a new or empty " \
                "folder or continues its own run: choose another --out"
    cases = [
        (proj, [], f"{proj}: " + not_train.format("it holds notes, which fluxjax train does not write")),
        (lproj, ["--lora-rank", "4"], f"{lproj}: " + not_train.format("no fluxjax-train.json or checkpoints/ in it")),
        (linked, [], f"{linked}: " + not_train.format("no fluxjax-train.json or checkpoints/ in it")),
        (owned, [], f"{owned / 'model'}: not written by fluxjax train (it is a symbolic link), and the run replaces "
                    "it at the end: move it elsewhere or choose another --out"),
        (tmp_path / "afile" / "sub", [], f"{tmp_path / 'afile' / 'sub'}: cannot be created: {tmp_path / 'afile'} is a "
                                         "file, not a folder; choose another --out"),
        (tmp_path / "new", ["--lr", "nan"], "--lr must be a finite number, got nan"),
        (tmp_path / "new", ["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    ]
    before = tree_bytes(tmp_path)
    for out, extra, message in cases:
        assert _train_error(capsys, data, "--out", out, "--steps", "2", "--resolution", "32", *extra) == message
        assert tree_bytes(tmp_path) == before
    with pytest.raises(UsageError, match="learning_rate must be a finite number, got inf"):
        TrainConfig(learning_rate=float("inf"))


def test_resume_refuses_settings_that_change_the_run(tmp_path, capsys, tiny):
    """N110-N112: --resume with another batch size, rate, parameter dtype, resolution, or adding a
    LoRA or an EMA: one line naming each changed setting and the run's, before the model loads
    (not Orbax's 34 KB tree diff after it); --steps may change (a resumed run may go further)."""
    from test_convert import tree_bytes

    from fluxjax.training.trainer import _write_run_marker, run_settings

    model, params, batch = tiny
    data = make_folder(tmp_path / "data", sizes=((40, 24),))
    out = tmp_path / "out"
    save_state(out / "checkpoints" / "step_00000002", Trainer(model, TrainConfig(), Schedule.dev()).init(params))
    _write_run_marker(str(out), run_settings(TrainConfig(total_steps=4), 1, 0, 64, None))
    before = tree_bytes(out)
    common = [data, "--out", out, "--steps", "6", "--resolution", "64", "--resume"]
    tail = "; resume with the run's settings, or start a new run in another --out"
    cases = [
        (["--batch-size", "2", "--lr", "0.5"], "--batch-size 2 (the run has 1), --lr 0.5 (the run has 0.0001)"),
        (["--param-dtype", "bfloat16"], "--param-dtype bfloat16 (the run has float32)"),
        (["--resolution", "32"], "--resolution 32 (the run has 64)"),
        (["--lora-rank", "4"], "--lora-rank 4 (the run has none)"),
        (["--ema", "0.9"], "--ema 0.9 (the run has none)"),
    ]
    for extra, changed in cases:
        message = _train_error(capsys, *common, *extra)
        assert message == f"{out}: --resume with settings that change the run: {changed}{tail}"
        assert tree_bytes(out) == before


def test_a_second_run_on_one_out_is_refused_naming_the_first(tmp_path, capsys):
    """N122: while a run holds --out (its lock), another is refused in one line naming its
    process, before its model loads; the lock goes with the run."""
    import subprocess
    import sys

    out = tmp_path / "cc"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fluxjax.files import locked\n"
         "with locked(sys.argv[1], '--out'):\n    print('held', flush=True); time.sleep(300)", str(out)],
        env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = _train_error(capsys, make_folder(tmp_path / "data", sizes=((40, 24),)), "--out", out, "--steps", "2")
    finally:
        holder.kill()
        holder.wait()
    assert message.startswith(f"{out}: another fluxjax run is writing it (process {holder.pid} on ")
    assert message.endswith(f"{out}); wait for it to end or choose another --out")
    assert not out.exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    """N113, N114: the newest checkpoint with its largest data file deleted, or its metadata: the
    run resumes from the one before, saying so in one line, and ends bit-identical to the
    undamaged run; with no readable checkpoint left, one line naming it."""
    data = make_folder(tmp_path / "data", sizes=((40, 24),))
    out = tmp_path / "run"
    argv = ["--resolution", "32", "--steps", "4", "--save-every", "2", "--dtype", "float32", "--max-sequence-length", "16"]
    assert run_cli(capsys, data, "--out", out, *argv)[0] == 0
    want, loss = _final_state(out), (out / "loss.csv").read_text()

    def largest_data_file(step):
        return max(glob.glob(str(out_d / "checkpoints" / step / "state" / "ocdbt.process_*" / "d" / "*")),
                   key=os.path.getsize)

    def poison(newest):
        """Damage that still decodes (the re-run of N113 zeroed 2 KiB of a data file and read back
        802 changed values, some non-finite): one moment of Adam's first leaf set to NaN."""
        import orbax.checkpoint.experimental.v1 as ocp

        tree = ocp.load(str(newest))
        path, leaf = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                          if "mu" in jax.tree_util.keystr(p) and np.asarray(x).size)
        leaf = np.array(leaf)
        leaf.flat[0] = np.nan
        tree = jax.tree_util.tree_map_with_path(lambda p, x: leaf if p == path else x, tree)
        shutil.rmtree(newest)
        ocp.save(str(newest), tree)

    for damage in ("data_file", "metadata", "nan"):
        out_d = tmp_path / damage
        shutil.copytree(out, out_d, symlinks=True)
        newest = out_d / "checkpoints" / "step_00000004"
        if damage == "nan":
            poison(newest)
        else:
            os.remove(largest_data_file("step_00000004") if damage == "data_file" else newest / "_CHECKPOINT_METADATA")
        code, err = run_cli(capsys, data, "--out", out_d, *argv, "--resume")
        assert code == 0 and "\n" not in err, err
        assert re.fullmatch(rf"fluxjax train: warning: {re.escape(str(newest))}: cannot be read \(.+\); resuming from "
                            rf"{re.escape(str(out_d / 'checkpoints' / 'step_00000002'))}", err), err
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(want, _final_state(out_d)))
        assert (out_d / "loss.csv").read_text() == loss

    out_d = tmp_path / "both"
    shutil.copytree(out, out_d, symlinks=True)
    os.remove(out_d / "checkpoints" / "step_00000004" / "_CHECKPOINT_METADATA")
    os.remove(largest_data_file("step_00000002"))
    code, err = run_cli(capsys, data, "--out", out_d, *argv, "--resume")
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2 and lines[0].startswith("fluxjax train: warning: "), err
    assert re.fullmatch(rf"fluxjax train: error: {re.escape(str(out_d / 'checkpoints' / 'step_00000002'))}: cannot be "
                        rf"read \(.+\), and no older checkpoint can: remove {re.escape(str(out_d / 'checkpoints'))} to "
                        "start the run again", lines[1]), err


def test_a_diverging_run_stops_in_one_line_and_writes_no_model(tmp_path, capsys):
    """A loss that turns NaN or infinite (here an absurd learning rate) stops the run at that step
    in one line: no NaN row in loss.csv, no model/ written (the re-run of N113 trained past a
    damaged checkpoint to a NaN model with exit 0)."""
    data = make_folder(tmp_path / "data", sizes=((40, 24),))
    out = tmp_path / "run"
    code, err = run_cli(capsys, data, "--out", out, "--resolution", "32", "--steps", "6", "--save-every", "2",
                        "--dtype", "float32", "--max-sequence-length", "16", "--lr", "1e30")
    assert code == 2, err
    match = re.fullmatch(r"fluxjax train: error: training diverged at step (\d+): the loss is (nan|inf); no model "
                         r"was written(, the last checkpoint is .+)?", err.strip())
    assert match, err
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == int(match.group(1)) - 1 and all(np.isfinite(float(r.split(",")[1])) for r in rows)
    assert not (out / "model").exists()


def test_background_aftermath_of_a_reported_error_is_quiet():
    """N116, N117, N125: the CLI's one line is not buried under absl's log of each failed Orbax
    write (230-395 lines on a full disk) or the tracebacks of Orbax's leftover threads and
    coroutines after Ctrl-C or a failed read; any other error still reaches the hooks."""
    import logging
    import sys
    import threading
    import types

    from fluxjax.commands.cli import quiet_libraries

    absl = logging.getLogger("absl")
    saved = sys.unraisablehook, sys.excepthook, threading.excepthook, absl.level, logging.getLogger("asyncio").filters[:]
    reached = []
    sys.unraisablehook = lambda u: reached.append(("unraisable", str(u.exc_value)))
    sys.excepthook = lambda t, v, tb: reached.append(("except", str(v)))
    threading.excepthook = lambda a: reached.append(("thread", str(a.exc_value)))
    try:
        quiet_libraries()
        assert not absl.isEnabledFor(logging.ERROR) and absl.isEnabledFor(logging.CRITICAL)
        task = "Task exception was never retrieved\nfuture: <Task finished name='Task-483' coro=<{}() done, defined at {}>"
        asyncio_log = logging.getLogger("asyncio")
        assert not asyncio_log.filter(asyncio_log.makeRecord(
            "asyncio", logging.ERROR, "", 0, task.format("_read_array_index_and_device_put", "/x/orbax/checkpoint/a.py"),
            (), None))
        assert asyncio_log.filter(asyncio_log.makeRecord("asyncio", logging.ERROR, "", 0, task.format("mine", "/x/app.py"),
                                                         (), None))

        async def _read_array_index_and_device_put():  # stands for Orbax's own coroutine
            pass

        coroutine = _read_array_index_and_device_put()
        coroutine.close()
        orbax_code = coroutine.cr_code.replace(co_filename="/site-packages/orbax/checkpoint/serialization.py")
        orbax_coroutine = types.SimpleNamespace(cr_code=orbax_code)
        for exc, obj in [(RuntimeError("Event loop is closed"), None), (ValueError("DATA_LOSS"), orbax_coroutine),
                         (RuntimeError("real trouble"), None)]:
            sys.unraisablehook(types.SimpleNamespace(exc_value=exc, object=obj))
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
        sys.excepthook(OSError, OSError("real trouble"), None)
        for message in ("cannot schedule new futures after interpreter shutdown", "real trouble"):
            threading.excepthook(types.SimpleNamespace(exc_value=RuntimeError(message)))
    finally:
        sys.unraisablehook, sys.excepthook, threading.excepthook = saved[:3]
        absl.setLevel(saved[3])
        logging.getLogger("asyncio").filters[:] = saved[4]
    assert reached == [("unraisable", "real trouble"), ("except", "real trouble"), ("thread", "real trouble")]
