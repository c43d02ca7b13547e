"""Issue 31 items 1, 2 and 4: the folders fluxjax writes and replaces (fluxjax.files), through
`fluxjax convert` and fluxjax.training.trainer.write_model. Every refusal is one line, exit 2, and the
user's files (at every depth) survive byte for byte; a folder appearing at DST during a
conversion (another process, a real race) is never removed; two conversions to one DST are
refused by a lock naming the other process."""

import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from test_convert import REPO, convert_cli, hub, one_line_error, tree_bytes  # noqa: F401 (hub: a fixture)

from fluxjax import files
from fluxjax.commands.cli import main

NOT_CONVERTS = "already exists and was not written by fluxjax convert ({}); fluxjax replaces only its own folders: choose another DST"


def _user_edits(root):
    """(name, edit(DST) -> None, why) of the user's files added to a converted hub folder at every depth."""
    def replace_vae(dst):  # N134: the user's own safetensors VAE and a README in place of the component
        shutil.rmtree(dst / "vae")
        shutil.copytree(root / "vae", dst / "vae")
        (dst / "vae" / "README.txt").write_text("mine")

    def grow(path):
        return lambda dst: (dst / path).write_text((dst / path).read_text() + "\n")

    return [
        ("tokenizer_note", lambda dst: (dst / "tokenizer" / "notes.txt").write_text("notes"),  # N133
         "it holds tokenizer/notes.txt, which fluxjax does not write"),
        ("own_vae", replace_vae, "it holds vae/README.txt, vae/diffusion_pytorch_model.safetensors, which fluxjax does not write"),
        ("params_file", lambda dst: (dst / "transformer" / "params" / "notes.txt").write_text("mine"),  # N135
         "it holds transformer/params/notes.txt, which fluxjax does not write"),
        ("scheduler_and_folder", lambda dst: ((dst / "scheduler" / "mine.txt").write_text("x"),  # N136
                                              (dst / "text_encoder" / "params" / "mine" / "deep").mkdir(parents=True),
                                              (dst / "text_encoder" / "params" / "mine" / "deep" / "f").write_text("y")),
         "it holds scheduler/mine.txt, text_encoder/params/mine, which fluxjax does not write"),
        ("edited_config", grow("scheduler/scheduler_config.json"),
         "scheduler/scheduler_config.json changed since fluxjax wrote it"),
    ]


@pytest.fixture(scope="module")
def converted_hub(hub, tmp_path_factory):
    root, _ = hub
    dst = tmp_path_factory.mktemp("owned") / "conv"
    assert main(["convert", str(root), str(dst)]) == 0
    return dst


def test_overwrite_refuses_user_files_at_every_depth(hub, converted_hub, tmp_path, capsys):
    """N133-N136: a note in tokenizer/, the user's VAE in place of a component, a file in
    transformer/params/, in scheduler/, a folder in text_encoder/params/, an edited config: each
    refused in one line naming it, nothing changed; an untouched copy is replaced."""
    root, _ = hub
    for name, edit, why in _user_edits(root):
        dst = tmp_path / name
        shutil.copytree(converted_hub, dst, symlinks=True)
        edit(dst)
        before = tree_bytes(dst)
        code, err = convert_cli(root, dst, "--overwrite", capsys=capsys)
        assert code == 2 and one_line_error(err) == f"{dst}: " + NOT_CONVERTS.format(why), (name, err)
        assert tree_bytes(dst) == before and not glob.glob(f"{dst}.*")
    clean = tmp_path / "clean"
    shutil.copytree(converted_hub, clean, symlinks=True)
    assert convert_cli(root, clean, "--overwrite", capsys=capsys)[0] == 0
    assert files.owned_why(str(clean), "convert") == "" and not glob.glob(f"{clean}.*")


def test_folder_without_manifest_is_refused_saying_how_to_proceed(hub, converted_hub, tmp_path, capsys):
    """A conversion by a fluxjax before the manifest: its top level looks like one, but files of
    the user's below it cannot be told apart, so it is refused with what to do."""
    root, _ = hub
    old = tmp_path / "old"
    shutil.copytree(converted_hub, old, symlinks=True)
    (old / files.MANIFEST).unlink()
    before = tree_bytes(old)
    code, err = convert_cli(root, old, "--overwrite", capsys=capsys)
    assert code == 2 and one_line_error(err) == f"{old}: " + NOT_CONVERTS.format(
        "it has no fluxjax-manifest.json, the list of the files fluxjax wrote, which fluxjax keeps since 2026-12: files "
        "of yours below its top level cannot be told apart; if it holds nothing of yours, remove it yourself")
    assert tree_bytes(old) == before


def test_convert_refuses_a_trained_model_and_train_refuses_user_files(hub, tmp_path, capsys):
    """N140: `convert --overwrite` onto a `fluxjax train` model/ is refused (its manifest says
    train wrote it: the trained transformer would be lost). N118 at the swap: write_model replaces
    its own model/ but not one the user put a file into meanwhile."""
    from fluxjax.pipeline.pipeline import FluxPipeline
    from fluxjax.training.trainer import write_model

    root, _ = hub
    pipe = FluxPipeline.from_pretrained("tiny", dtype="float32")
    params = pipe.transformer.params
    model = tmp_path / "run" / "model"
    write_model(str(model), pipe, params, None)
    write_model(str(model), pipe, jax.tree.map(lambda x: x + 1, params), None)  # its own: replaced
    before = tree_bytes(model)
    code, err = convert_cli(root, model, "--overwrite", capsys=capsys)
    assert code == 2 and one_line_error(err) == f"{model}: " + NOT_CONVERTS.format("it was written by fluxjax train")
    assert tree_bytes(model) == before

    (model / "transformer" / "notes.txt").write_text("mine")
    before = tree_bytes(model)
    with pytest.raises(FileExistsError) as e:
        write_model(str(model), pipe, params, None)
    assert str(e.value) == (f"{model}: fluxjax train replaces only a folder it wrote (it holds transformer/notes.txt, "
                            "which fluxjax does not write)")
    assert tree_bytes(model) == before and sorted(os.listdir(model.parent)) == ["model"]


def test_dst_under_a_file_is_one_line(hub, tmp_path, capsys):
    """N145: `convert SRC FILE/sub`."""
    root, _ = hub
    (tmp_path / "afile").write_text("mine")
    code, err = convert_cli(root, tmp_path / "afile" / "sub", capsys=capsys)
    assert code == 2 and one_line_error(err) == (f"{tmp_path / 'afile' / 'sub'}: cannot be created: {tmp_path / 'afile'} "
                                                 "is a file, not a folder; choose another DST")
    assert (tmp_path / "afile").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


# A conversion paused at its first leaf until the file named first on its command line exists: its
# staging folder and its lock are there meanwhile, so the test acts while it runs, then lets it go on.
PAUSED_SCRIPT = """
import os, sys, time
import fluxjax.loading.checkpoint as checkpoint
from fluxjax.commands.cli import main

go = sys.argv[1]
add = checkpoint.ParamsWriter.add
def paused_add(self, path, value):
    deadline = time.time() + 300
    while not os.path.exists(go):
        assert time.time() < deadline, "the test never let the conversion go on"
        time.sleep(0.01)
    add(self, path, value)
checkpoint.ParamsWriter.add = paused_add
sys.exit(main(["convert", *sys.argv[2:]]))
"""


def _paused_convert(go, *argv):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", PAUSED_SCRIPT, str(go), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(dst, proc):
    deadline = time.time() + 120
    while not glob.glob(f"{dst}{files.STAGING}*"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_appearing_at_dst_during_a_conversion_survives(hub, converted_hub, tmp_path, tmp_path_factory, overwrite):
    """N143, a real race: once the conversion's staging folder exists, another process makes
    DST/project/main.py (DST new, or, with --overwrite, fluxjax's own folder). The conversion
    refuses at the swap in one line and the user's file survives byte for byte."""
    root, _ = hub
    dst = tmp_path / "race"
    if overwrite:
        shutil.copytree(converted_hub, dst, symlinks=True)
    go = tmp_path_factory.mktemp("go") / "go"
    proc = _paused_convert(go, root, dst, *(["--overwrite"] if overwrite else []))
    _wait_for_staging(dst, proc)
    (dst / "project").mkdir(parents=True)
    (dst / "project" / "main.py").write_text("print('mine')")
    before = tree_bytes(dst)
    go.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    why = (f"{dst}: changed while fluxjax convert ran (it holds project, which fluxjax does not write); it is left as "
           "it is and the new folder was not installed" if overwrite else
           f"{dst}: appeared while fluxjax was writing it; it is left as it is and the new folder was not installed: "
           "choose another DST, or remove it and run again")
    assert one_line_error(err) == why
    assert tree_bytes(dst) == before and not glob.glob(f"{dst}.*")


@pytest.mark.slow
def test_two_conversions_to_one_dst_are_refused_by_a_lock(hub, tmp_path, tmp_path_factory, capsys):
    """N142: a second conversion to a DST another is writing is refused in one line naming the
    first process; the first completes; a killed holder's lock file is no obstacle."""
    root, _ = hub
    dst = tmp_path / "cc"
    go = tmp_path_factory.mktemp("go") / "go"
    proc = _paused_convert(go, root, dst)
    _wait_for_staging(dst, proc)
    code, err = convert_cli(root / "vae", dst, capsys=capsys)
    assert code == 2
    assert re.fullmatch(rf"{re.escape(str(dst))}: another fluxjax run is writing it \(process {proc.pid} on \S+: .*"
                        rf"{re.escape(str(dst))}\); wait for it to end or choose another DST", one_line_error(err)), err
    go.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(os.listdir(tmp_path)) == ["cc"] and (dst / "model_index.json").exists()

    stale = tmp_path / "stale"
    (tmp_path / "stale.lock").write_text("process 999999 on a host that is gone: fluxjax convert")  # no flock held
    assert convert_cli(root / "vae", stale, capsys=capsys)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["cc", "stale"]
