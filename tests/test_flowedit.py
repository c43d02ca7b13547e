"""FlowEdit (fluxjax/sampling/flowedit.py, pipe.edit, `fluxjax edit`) against the paper's algorithm in PyTorch.

The reference is written here straight from Algorithm 1 of Kulikov et al. (arXiv 2412.08629) as
the authors' FLUX code runs it: a plain Python loop around diffusers' FluxTransformer2DModel of
a small random hub-layout folder (fluxjax/testing/reference.py), the same weights, the same noise draws
(fluxjax's per-step draws handed to it), diffusers' own VAE, text encoders and scheduler.
Limits (the issue's): edited latents within 1e-4 relative (max abs error / max abs value) in
float32, pixels on [0, 1] within 1e-3. Measured: latents 1.5e-5 to 2.6e-5 dev-like, 1.1e-6 to
3.3e-6 schnell-like; pixels 3e-5 to 6.5e-5 dev-like, 2.5e-6 to 5.1e-6 schnell-like.
"""

import json
import os
import types

import jax
import numpy as np
import pytest

import torch

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402

from fluxjax.pipeline import conditioning  # noqa: E402
from fluxjax.sampling import flowedit  # noqa: E402
from fluxjax.sampling import sampler as sampling  # noqa: E402
from fluxjax.errors import UsageError  # noqa: E402
from fluxjax.pipeline.pipeline import FluxPipeline  # noqa: E402

HEIGHT, WIDTH = 48, 80  # 3 x 5 tokens: a swapped height and width shows
TOKENS = (HEIGHT // 16) * (WIDTH // 16)
T5_LENGTH = 32
SOURCE, TARGET = "a red circle on a blue background", "a green square on a blue background"
STEPS = {"dev": 6, "schnell": 4}
N_MAX = {"dev": 5, "schnell": 4}  # schnell from t = 1: n_max = T is allowed
GUIDANCE = {"dev": (1.5, 5.5), "schnell": (None, None)}
SEED = 10


def source_image(height=HEIGHT, width=WIDTH, phase=0.0) -> np.ndarray:
    """A smooth uint8 (H, W, 3) image with a disc: natural enough for the VAE, not a constant."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + phase), 0.5 + 0.4 * np.cos(5 * y - phase), 0.3 + 0.3 * x * y], -1)
    rgb[(x - 0.6) ** 2 + (y - 0.3) ** 2 < 0.04] = (0.9, 0.1, 0.1)
    return np.round(rgb * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def hub(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"hub_edit_{kind}")
    reference = make_hub_pipeline(root, kind)
    pipe = FluxPipeline.from_pretrained(root, dtype="float32")
    return types.SimpleNamespace(kind=kind, root=root, reference=reference, pipe=pipe)


def reference_edit(ref, kind, image, n_min, n_avg, seed=SEED):
    """Algorithm 1 in PyTorch, as the authors' FLUX code runs it; returns (packed latents, pixels)."""
    steps, n_max = STEPS[kind], N_MAX[kind]
    g_src, g_tar = GUIDANCE[kind]
    vae, transformer = ref.vae, ref.transformer
    with torch.no_grad():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        z = vae.encode(pixels).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        x_src = ref._pack_latents(z, 1, 16, HEIGHT // 8, WIDTH // 8)
        src = ref.encode_prompt(SOURCE, prompt_2=None, max_sequence_length=T5_LENGTH)
        tar = ref.encode_prompt(TARGET, prompt_2=None, max_sequence_length=T5_LENGTH)
        img_ids = ref._prepare_latent_image_ids(1, HEIGHT // 16, WIDTH // 16, "cpu", torch.float32)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(TOKENS))
        sigmas = scheduler.sigmas

        def velocity(x, t, prompts, guidance):
            """v for a batch of latents x, each row with its own (embeds, pooled, text_ids) and guidance."""
            embeds = torch.cat([p[0] for p in prompts])
            pooled = torch.cat([p[1] for p in prompts])
            g = None if guidance[0] is None else torch.tensor(guidance, dtype=torch.float32)
            return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), guidance=g, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=prompts[0][2], img_ids=img_ids).sample

        z_edit = x_src.clone()
        for i in range(steps):
            if steps - i > n_max:
                continue
            t, t_next = sigmas[i], sigmas[i + 1]
            draws = torch.from_numpy(flowedit.noise([seed], i, n_avg, TOKENS)[0])
            if steps - i > n_min:
                v_delta = torch.zeros_like(x_src)
                for k in range(n_avg):
                    zt_src = (1 - t) * x_src + t * draws[k][None]
                    zt_tar = z_edit + zt_src - x_src
                    v = velocity(torch.cat([zt_src, zt_tar]), t, [src, tar], [g_src, g_tar])
                    v_delta += (v[1:] - v[:1]) / n_avg
                z_edit = z_edit + (t_next - t) * v_delta
            else:
                if i == steps - n_min:
                    xt_src = t * draws[0][None] + (1 - t) * x_src
                    xt_tar = z_edit + xt_src - x_src
                xt_tar = xt_tar + (t_next - t) * velocity(xt_tar, t, [tar], [g_tar])
        out = z_edit if n_min == 0 else xt_tar
        latents = ref._unpack_latents(out, HEIGHT, WIDTH, 8)
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
        images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return out.numpy(), images.numpy()


def edit(hub, image, output, n_min=0, n_avg=1, **kw):
    g_src, g_tar = GUIDANCE[hub.kind]
    args = dict(num_steps=STEPS[hub.kind], n_max=N_MAX[hub.kind], n_min=n_min, n_avg=n_avg, source_guidance=g_src,
                target_guidance=g_tar, seed=SEED, max_sequence_length=T5_LENGTH, output=output)
    return hub.pipe.edit(image, SOURCE, TARGET, **{**args, **kw})


@pytest.mark.parametrize("n_min, n_avg", [(0, 1), (0, 2), (1, 1), (2, 2)])
def test_edit_matches_the_papers_algorithm(hub, n_min, n_avg):
    image = source_image()
    ref_latents, ref_pixels = reference_edit(hub.reference, hub.kind, image, n_min, n_avg)
    ours = edit(hub, image, "latents", n_min, n_avg)
    assert ours.shape == (1, 16, HEIGHT // 8, WIDTH // 8) and ours.dtype == np.float32
    packed = np.asarray(sampling.pack(ours))
    error = np.abs(packed - ref_latents).max() / np.abs(ref_latents).max()
    assert error <= 1e-4, error
    pixels = edit(hub, image, "np", n_min, n_avg)
    inside = ((ref_pixels > 0) & (ref_pixels < 1)).mean()
    assert inside > 0.9, "the fixture's pixels should not be mostly clamped, or the comparison proves little"
    assert np.abs(pixels - ref_pixels).max() <= 1e-3
    # The edit changed something: the target prompt moved the latents away from the source's.
    source = np.asarray(conditioning.encode_packed(hub.pipe.vae.model, hub.pipe.vae.params,
                                                   conditioning.to_model_pixels(image[None])))
    assert np.abs(packed - source).max() > 100 * np.abs(packed - ref_latents).max()


@pytest.mark.parametrize("n_avg", [1, 2])
def test_identity_returns_the_source_latents_exactly(hub, n_avg):
    image = source_image()
    g = 2.0 if hub.kind == "dev" else None
    ours = hub.pipe.edit(image, SOURCE, SOURCE, num_steps=STEPS[hub.kind], n_max=N_MAX[hub.kind], n_avg=n_avg,
                         source_guidance=g, target_guidance=g, max_sequence_length=T5_LENGTH, output="latents")
    source = conditioning.encode_packed(hub.pipe.vae.model, hub.pipe.vae.params, conditioning.to_model_pixels(image[None]))
    np.testing.assert_array_equal(ours, np.asarray(sampling.unpack(source, HEIGHT, WIDTH)))


def test_second_edit_does_not_compile(hub):
    """A new image, prompts, seed, n_max, n_min and guidance at the same size, T and n_avg reuse every executable."""
    first = edit(hub, source_image(), "np", n_min=1)
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    g = {"source_guidance": 2.0, "target_guidance": 4.0} if hub.kind == "dev" else {}
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = hub.pipe.edit(source_image(phase=1.0), "a photo of a dog", "a photo of a cat", num_steps=STEPS[hub.kind],
                               n_max=N_MAX[hub.kind] - 1, n_min=0, seed=3, max_sequence_length=T5_LENGTH, output="np", **g)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert not np.allclose(first, second)


def test_an_edit_depends_only_on_its_own_seed(hub):
    images = [source_image(), source_image(phase=2.0)]
    both = edit(hub, images, "latents", seed=[SEED, 4])
    alone = edit(hub, images[1], "latents", seed=4)
    # batch 1 and batch 2 are different executables whose float32 rounding differs (as in test_pipeline)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[0], edit(hub, images[0], "latents")[0], atol=1e-5, rtol=0)


def test_defaults(hub):
    d = flowedit.DEFAULTS
    assert (d["dev"].steps, d["dev"].n_max, d["dev"].n_min, d["dev"].n_avg) == (28, 24, 0, 1)
    assert (d["dev"].source_guidance, d["dev"].target_guidance) == (1.5, 5.5)
    resolved = flowedit.EditSettings().resolve(hub.pipe.kind, hub.pipe.transformer.model.config.guidance_embed)
    if hub.kind == "schnell":
        assert (resolved.steps, resolved.n_max, resolved.source_guidance) == (4, 3, None)
        with pytest.raises(UsageError, match="source_guidance: the model .schnell. has no guidance embedding"):
            edit(hub, source_image(), "np", source_guidance=1.5)
    else:
        assert resolved == d["dev"]
        # fewer steps than the default n_max: every step is edited
        assert flowedit.EditSettings(steps=10).resolve("dev", True).n_max == 10


@pytest.mark.parametrize("bad, match", [
    (dict(n_min=3, n_max=2), "n_min 3 is more than n_max 2"),
    (dict(n_max=9), "n_max 9 is more than the"),
    (dict(n_avg=0), "n_avg must be an integer >= 1"),
    (dict(image=source_image(50, WIDTH)), "image is 80x50, not a multiple of 16"),
    (dict(image="/nonexistent/photo.png"), "image /nonexistent/photo.png: no such file"),
    (dict(resize="stretch", image=source_image(50, WIDTH)), "resize must be one of crop, scale"),
    (dict(output="tensor"), "output must be 'np', 'pil' or 'latents'"),
    (dict(image=[source_image(), source_image(64, 64)]), "must have one size"),
])
def test_bad_input(hub, bad, match):
    bad = dict(bad)  # the parameters are shared by both models' runs
    image = bad.pop("image", source_image())
    with pytest.raises(UsageError, match=match):
        edit(hub, image, bad.pop("output", "np"), **bad)


def test_resize_policies(tmp_path):
    odd = source_image(50, 83)
    cropped = conditioning.load_image(odd, "crop")
    np.testing.assert_array_equal(cropped, odd[:48, :80])  # the right and bottom remainder dropped
    assert conditioning.load_image(odd, "scale").shape == (48, 80, 3)
    path = tmp_path / "odd.png"
    from PIL import Image

    Image.fromarray(odd).save(path)
    assert conditioning.image_size(path, "crop") == (48, 80)
    np.testing.assert_array_equal(conditioning.load_image(path, "crop"), cropped)


# --- the command line -------------------------------------------------------------------------

def run_cli(*args):
    from fluxjax.commands.cli import main

    return main(["edit", *map(str, args)])


@pytest.mark.parametrize("hub", ["dev"], indirect=True)  # one model suffices for the command line
def test_cli_writes_the_edit_with_its_settings(hub, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(source_image()).save(src)
    out = tmp_path / "out.png"
    assert run_cli(src, "--model", hub.root, "--source-prompt", SOURCE, "--target-prompt", TARGET, "--out", out,
                   "--steps", 6, "--n-max", 5, "--n-min", 1, "--n-avg", 2, "--source-guidance", 1.5,
                   "--target-guidance", 5.5, "--seed", SEED, "--dtype", "float32", "--max-sequence-length", T5_LENGTH) == 0
    written = Image.open(out)
    text = dict(written.text)
    assert text["method"] == "flowedit" and text["source_prompt"] == SOURCE and text["prompt"] == TARGET
    assert (text["steps"], text["n_max"], text["n_min"], text["n_avg"]) == ("6", "5", "1", "2")
    assert (text["source_guidance"], text["target_guidance"], text["seed"]) == ("1.5", "5.5", str(SEED))
    assert text["size"] == f"{WIDTH}x{HEIGHT}" and text["source_image"] == "in.png" and len(text["source_sha256"]) == 64
    expected = edit(hub, source_image(), "pil", n_min=1, n_avg=2)[0]
    np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))


@pytest.mark.parametrize("args, size, match", [
    (["--n-min", "3", "--n-max", "2"], (HEIGHT, WIDTH), "n_min 3 is more than n_max 2"),
    (["--n-max", "30", "--steps", "28"], (HEIGHT, WIDTH), "n_max 30 is more than the 28 steps"),
    ([], (50, WIDTH), "is 80x50, not a multiple of 16"),
    ([], None, "in.png: no such file"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, size, match):
    from PIL import Image

    src = tmp_path / "in.png"
    if size is not None:
        Image.fromarray(source_image(*size)).save(src)
    before = sorted(os.listdir(tmp_path))
    code = run_cli(src, "--model", "tiny", "--source-prompt", "a", "--target-prompt", "b", "--out", tmp_path / "out.png",
                   *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kind", ["trunc", "bomb"])
def test_cli_damaged_image_is_one_line_before_loading(tmp_path, capsys, monkeypatch, kind):
    """N88, N89: a truncated image or a decompression bomb is decoded before the model loads."""
    import bad_images
    from PIL import Image

    from fluxjax.pipeline.pipeline import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    files = bad_images.make(tmp_path / "in")
    path = files["ok" if kind == "bomb" else kind]
    why = "OSError: image file is truncated"
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", bad_images.BOMB_LIMIT)
        why = ("DecompressionBombError: Image size (1536 pixels) exceeds limit of 1000 pixels, could be decompression "
               "bomb DOS attack.")
    code = run_cli(path, "--model", "tiny", "--source-prompt", "a", "--target-prompt", "b", "--out", tmp_path / "out.png")
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"fluxjax edit: error: image {path}: unreadable image ({why})"]
    assert sorted(os.listdir(tmp_path)) == ["in"]


# --- fluxjax batch: edit jobs in JSONL ----------------------------------------------------------

def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["dev"], indirect=True)  # one model suffices for the command line
def test_batch_runs_edit_jobs_beside_prompts(hub, tmp_path, capsys):
    from PIL import Image

    from fluxjax.commands.cli import main

    Image.fromarray(source_image()).save(tmp_path / "a.png")
    Image.fromarray(source_image(phase=2.0)).save(tmp_path / "b.png")
    g_src, g_tar = GUIDANCE["dev"]
    common = dict(steps=STEPS["dev"], n_max=N_MAX["dev"], n_min=1, n_avg=2, source_guidance=g_src, target_guidance=g_tar)
    jobs = tmp_path / "jobs.jsonl"
    write_jsonl(jobs, [
        dict(image="a.png", source_prompt=SOURCE, target_prompt=TARGET, seed=SEED, name="edit_a", **common),
        {"prompt": "a photo of a cat", "height": HEIGHT, "width": WIDTH, "steps": 2},
        dict(image="b.png", source_prompt=SOURCE, target_prompt=TARGET, seed=4, **common),
    ])
    out = tmp_path / "out"
    args = ["batch", str(jobs), "--out-dir", str(out), "--model", str(hub.root), "--dtype", "float32"]
    assert main(args) == 0
    assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == ["000001.png", "000002.png", "edit_a.png"]
    written = Image.open(out / "edit_a.png")
    assert written.text["method"] == "flowedit" and written.text["n_avg"] == "2" and written.text["source_image"] == "a.png"
    # T5 length: the batch uses the model's default (dev 512), so the reference edit does too.
    expected = hub.pipe.edit(source_image(), SOURCE, TARGET, num_steps=STEPS["dev"], n_max=N_MAX["dev"], n_min=1,
                             n_avg=2, source_guidance=g_src, target_guidance=g_tar, seed=SEED)[0]
    np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))
    capsys.readouterr()
    assert main(args) == 0  # a resume: everything recorded, nothing made again
    assert "0 done, 3 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("line, match", [
    (dict(n_min=3, n_max=2), "jobs.jsonl:1: n_min 3 is more than n_max 2"),
    (dict(steps=4, n_max=5), "jobs.jsonl:1: n_max 5 is more than the 4 steps"),
    (dict(image="missing.png"), "jobs.jsonl:1: image .*missing.png: no such file"),
    (dict(image="odd.png"), "jobs.jsonl:1: image .*odd.png is 80x50, not a multiple of 16"),
    (dict(n_avg="two"), "jobs.jsonl:1: n_avg must be an integer"),
    (dict(strength=0.5), "jobs.jsonl:1: unknown key 'strength' for an edit"),
])
def test_batch_refuses_bad_edit_lines_before_loading(tmp_path, capsys, line, match):
    import re

    from PIL import Image

    from fluxjax.commands.cli import main

    Image.fromarray(source_image()).save(tmp_path / "a.png")
    Image.fromarray(source_image(50, WIDTH)).save(tmp_path / "odd.png")
    jobs = tmp_path / "jobs.jsonl"
    write_jsonl(jobs, [{"image": "a.png", "source_prompt": "a", "target_prompt": "b", **line}])
    code = main(["batch", str(jobs), "--out-dir", str(tmp_path / "out"), "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "out").exists()
