"""`fluxjax generate` as a user runs it, and the persistent compilation cache setting."""

import os
import subprocess
import sys

import jax
import pytest
from PIL import Image

from fluxjax import cli
from fluxjax.cache import CACHE_ENV, enable_compilation_cache


def test_generate_tiny_writes_png_with_metadata(tmp_path):
    out = tmp_path / "cat.png"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", CACHE_ENV: "off", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "fluxjax.cli", "generate", "a photo of a cat", "--out", str(out),
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
