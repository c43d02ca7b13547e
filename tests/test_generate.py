"""`fluxjax generate` as a user runs it, and the persistent compilation cache setting."""

import os
import subprocess
import sys

import jax
import pytest
from PIL import Image

from fluxjax.commands import cli
from fluxjax.runtime import CACHE_ENV, enable_compilation_cache


def test_generate_tiny_writes_png_with_metadata(tmp_path):
    out = tmp_path / "cat.png"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", CACHE_ENV: "off", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "fluxjax.commands.cli", "generate", "a photo of a cat", "--out", str(out), "--model", "tiny",
         "--height", "64", "--width", "96", "--steps", "2", "--seed", "5"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "tiny preset" in run.stderr and "RANDOM weights" in run.stderr and "--model PATH" in run.stderr
    assert "encode" in run.stderr and "denoise" in run.stderr and "decode" in run.stderr  # stage times
    image = Image.open(out)
    image.verify()
    image = Image.open(out)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert image.text == {"prompt": "a photo of a cat", "seed": "5", "steps": "2", "guidance": "3.5",
                          "size": "96x64", "model": "tiny", "software": "fluxjax"}
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize("args, message", [
    (["--height", "1000"], "--height 1000 is not a multiple of 16; use 992 or 1008"),
    (["--width", "8"], "--width must be an integer >= 16"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--model", "/no/such/folder"], "/no/such/folder: no such folder"),
    (["--transformer", "/no/flux1-dev.safetensors", "--model", "tiny"], "--transformer /no/flux1-dev.safetensors: no such file"),
    (["--sharding", "zigzag"], "zigzag"),
])
def test_generate_bad_input_exits_nonzero_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a cat", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fluxjax generate: error: ") and message in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_missing_output_folder(tmp_path, capsys):
    assert cli.main(["generate", "a cat", "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compilation_cache_setting(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        monkeypatch.setenv(CACHE_ENV, "off")
        assert enable_compilation_cache() is None
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / "xla"))
        assert enable_compilation_cache() == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        monkeypatch.delenv(CACHE_ENV)
        assert enable_compilation_cache() == str(tmp_path / "xla")  # a folder already given to JAX is kept
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


# JAX's cache state is per process: a fresh interpreter compiles one small function with the cache on.
COMPILE_ONE = """
import jax, jax.numpy as jnp
from fluxjax.runtime import enable_compilation_cache
enable_compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(8)).block_until_ready()
"""


@pytest.mark.parametrize("user_min_time, entries", [(None, True), ("1000", False)])
def test_compilation_cache_keeps_fast_compilations(tmp_path, user_min_time, entries):
    """A compilation under JAX's default 1 s threshold still lands in fluxjax's cache (the probe's
    N176: the folder stayed empty on a CPU); a threshold the user gave JAX is kept."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", CACHE_ENV: str(tmp_path / "xla")}
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    if user_min_time is not None:
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = user_min_time
    subprocess.run([sys.executable, "-c", COMPILE_ONE], env=env, check=True, timeout=120)
    assert bool(os.listdir(tmp_path / "xla")) == entries


TINY = ["--model", "tiny", "--height", "32", "--width", "32", "--steps", "1"]


def one_line(capsys, command="generate"):
    """The one line `fluxjax COMMAND` printed on stderr, without its "fluxjax COMMAND: error: " prefix."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fluxjax {command}: error: "), lines
    return lines[0][len(f"fluxjax {command}: error: "):]


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/folder.png"], "--out {tmp}/folder.png: is a folder; give the PNG's file name"),  # item 7
    (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),  # item 10
    (["--seed", "100000000000000000000000"], "--seed must be an integer from 0 to 4294967295, got 100000000000000000000000"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295, got -1"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),  # item 13
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
])
def test_bad_arguments_are_one_line_before_loading(tmp_path, capsys, monkeypatch, args, message):
    """Issue 14 items 7, 10, 13: refused in one line, exit 2, before loading, nothing written."""
    from fluxjax.pipeline.pipeline import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    (tmp_path / "folder.png").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    out = ["--out", str(tmp_path / "x.png")] if "--out" not in args else []
    try:
        code = cli.main(["generate", "a cat", *TINY, *out, *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and one_line(capsys) == message.format(tmp=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["folder.png"] and not list((tmp_path / "folder.png").iterdir())


def test_non_utf8_prompt_is_refused(tmp_path, capsys):
    """Issue 14 item 9: bytes that are not UTF-8 reach Python as surrogates (surrogateescape)."""
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert cli.main(["generate", prompt, *TINY, "--out", str(tmp_path / "x.png")]) == 2
    assert one_line(capsys) == "PROMPT is not valid UTF-8 text (byte 0xe9 at character 4)"
    assert list(tmp_path.iterdir()) == []


def test_size_beyond_memory_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Issue 14 item 8: the largest image follows from the planner's step memory and the device's."""
    import re

    from fluxjax.config import FluxConfig
    from fluxjax.plan.limits import SizeLimit, device_memory
    from fluxjax.pipeline.pipeline import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    assert cli.main(["generate", "a cat", "--model", "tiny", "--height", "100000", "--width", "100000",
                     "--out", str(tmp_path / "x.png")]) == 2
    message = one_line(capsys)
    limit = SizeLimit(FluxConfig.preset("tiny"), 64, 1, "bfloat16", None, jax.devices()[:1])
    most = limit.largest_tokens()
    memory, where = device_memory(jax.devices()[0])
    assert where == "this host's RAM" and limit.memory == memory
    need = limit.step_bytes(6250 * 6250)
    side = int(most ** 0.5) * 16
    assert message == (f"--width/--height 100000x100000: one denoising step needs {need / 2**30:,.1f} GiB per device for "
                       f"its activations (fluxjax plan's analytic figure, 1 image(s) per device), more than the "
                       f"{memory / 2**30:.1f} GiB of this host's RAM; the largest image this model can make here has "
                       f"{most * 256:,} pixels (e.g. {side}x{side})")
    # the limit is the planner's: the largest token count fits, one more does not
    assert limit.step_bytes(most) <= memory < limit.step_bytes(most + 1)
    assert re.search(r"needs [\d,.]+ GiB", message) and list(tmp_path.iterdir()) == []


def test_an_invalid_config_in_fluxjax_json_names_the_file(tmp_path, capsys, monkeypatch):
    """N184: a converted folder's fluxjax.json edited to a config FluxConfig refuses: one line
    naming that file, before loading."""
    import dataclasses
    import json

    from fluxjax.loading.checkpoint import FORMAT
    from fluxjax.config import FluxConfig
    from fluxjax.pipeline.pipeline import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    (tmp_path / "model" / "transformer" / "params").mkdir(parents=True)
    config = dict(dataclasses.asdict(FluxConfig.preset("tiny")), hidden_size=64, num_heads=3)
    marker = tmp_path / "model" / "transformer" / "fluxjax.json"
    marker.write_text(json.dumps({"format": FORMAT, "model": "flux", "config": config, "dtype": "float32"}))
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a cat", "--model", str(tmp_path / "model"), "--out", str(out)]) == 2
    assert one_line(capsys) == f"{marker}: not a valid FluxConfig (FluxConfig: hidden_size 64 is not divisible by num_heads 3)"
    assert not out.exists()


@pytest.fixture(scope="module")
def poisoned():
    """The tiny pipeline with NaN VAE weights: its images come out NaN."""
    import copy

    import numpy as np

    from fluxjax.pipeline.pipeline import Component, FluxPipeline

    pipe = copy.copy(FluxPipeline.from_pretrained("tiny"))
    pipe.vae = Component(pipe.vae.model, jax.tree.map(lambda x: x * np.nan, pipe.vae.params))
    return pipe


def test_nan_weights_are_an_error_not_a_black_png(tmp_path, capsys, monkeypatch, poisoned):
    """Issue 14 item 13: non-finite output is refused, no PNG written."""
    from fluxjax.pipeline.pipeline import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: poisoned))
    assert cli.main(["generate", "a cat", *TINY, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("fluxjax generate: error: images 0 of the batch came out with NaN or infinite values "
                       "(non-finite weights or inputs); nothing is written for them")
    assert list(tmp_path.iterdir()) == []


GENERATE_KILL_SCRIPT = """
import os, signal, sys
import PIL.Image
from fluxjax.commands.cli import main

def save_then_die(self, fp, *args, **kw):  # a SIGKILL in the middle of writing the PNG
    with open(fp, "wb") as f:
        f.write(b"\\x89PNG\\r\\n")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

PIL.Image.Image.save = save_then_die
sys.exit(main(["generate", "a cat", "--model", "tiny", "--height", "32", "--width", "32", "--steps", "1",
               "--out", sys.argv[1]]))
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_no_png_and_the_next_run_cleans_up(tmp_path, capsys):
    """Issue 14 item 14: a real SIGKILL during the PNG write; the next run removes its temporary file."""
    out = tmp_path / "cat.png"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", CACHE_ENV: "off", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", GENERATE_KILL_SCRIPT, str(out)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name != "hf"]
    assert len(left) == 1 and left[0].name.startswith(".cat.png.") and left[0].name.endswith(".tmp")  # never cat.png
    assert cli.main(["generate", "a cat", *TINY, "--out", str(out)]) == 0
    assert f"removed 1 unfinished PNG temporary file(s) left by an interrupted run: {left[0]}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == ["cat.png"]
    Image.open(out).verify()


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    """N123: the PNG's write fails midway (ENOSPC): one line naming the file, exit 2, and neither
    the PNG nor its temporary is left."""
    import errno

    def full(image, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a cat", *TINY, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fluxjax generate: error: {out}: could not write the PNG (No space left on device); no file was left")
    assert list(tmp_path.iterdir()) == []
