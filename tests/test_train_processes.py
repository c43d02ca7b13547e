"""`fluxjax train` as 2 processes x 4 simulated CPU devices (tests/processes.py: a local
coordinator, gloo collectives) against 1 process x 8 devices, fsdp: the same loss.csv and final
weights (full fine-tuning and LoRA), the same files in --out, and a resumed run that ends where the
uninterrupted one did."""

import os
import shutil
import warnings

import jax
import numpy as np
import pytest

import processes
from test_train import make_folder

from fluxjax import files

# One bucket of 8 images (batch 8 divides fsdp's 8-way data axis), 4 steps, checkpoints at 2 and 4.
ARGS = ["--resolution", "32", "--steps", "4", "--save-every", "2", "--lr", "1e-3", "--warmup", "1", "--dtype", "float32",
        "--batch-size", "8", "--max-sequence-length", "16", "--sharding", "fsdp"]
# 1 x 8 is bit-identical from run to run. 2 x 4 sums the gradients over the devices in another
# order (gloo between the processes), as one device does against 1 x 8. Measured on this config
# (full fine-tuning, 4 steps): one device against 1 x 8 differs by 8.5e-7 in a loss (relative)
# and 7.0e-7 in a weight (absolute); 2 x 4 against 1 x 8 by 2.1e-7 and 4.5e-7. The tolerances
# are the one-device figures, rounded up (loss.csv keeps 8 significant digits). The LoRA run, 2 x 4
# against 1 x 8: 8.6e-8 and 1.9e-7.
LOSS_RTOL = 2e-6
WEIGHT_ATOL = 2e-6


def _train(data, out, n: int, *extra: str) -> None:
    args = ["train", str(data), "--out", str(out), *ARGS, *extra]
    processes.finish(processes.start_processes(args, n, processes.base_env(devices=8 // n)), timeout=900)


def _load(path) -> dict:
    """An Orbax checkpoint's arrays, read whole onto this process's one device."""
    import orbax.checkpoint.experimental.v1 as ocp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = ocp.pytree_metadata(os.fspath(path)).metadata
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        tree = ocp.load_pytree(os.fspath(path), abstract)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _losses(out) -> np.ndarray:
    return np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1)


def _files(out) -> set[str]:
    """Everything below out, an Orbax checkpoint's insides left out (they name the processes
    that wrote them: ocdbt.process_1/ and its hashed files)."""
    found = set()
    for root, dirs, files in os.walk(out):
        rel = os.path.relpath(root, out)
        if "_CHECKPOINT_METADATA" in files:  # an Orbax checkpoint: itself, not its insides
            found.add(rel)
            dirs[:] = []
            continue
        found.update(os.path.join(rel, f) for f in files + dirs)
    return found


def _assert_same_run(one, two) -> None:
    a, b = _losses(one), _losses(two)
    assert a.shape == b.shape == (4, 3) and np.array_equal(a[:, 0], b[:, 0])
    np.testing.assert_allclose(b[:, 1:], a[:, 1:], rtol=LOSS_RTOL, atol=0)
    assert _files(one) == _files(two)
    for out in (one, two):  # nothing of the run left beside --out or in it: no lock, no staging folder
        assert not [n for n in os.listdir(out.parent) if n.startswith(out.name) and n != out.name], out
        assert not [n for n in os.listdir(out) if files.STAGING in n or n.endswith(files.LOCK)], out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    data = make_folder(root / "data", sizes=((40, 24),) * 8)
    (root / "one").mkdir()
    (root / "two").mkdir()
    return root, data


@pytest.mark.slow
def test_two_processes_train_full_weights_as_one_and_resume(runs):
    root, data = runs
    one, two = root / "one" / "full", root / "two" / "full"
    _train(data, one, 1)
    _train(data, two, 2)
    _assert_same_run(one, two)
    # model/'s manifest names every file of it, each process's Orbax shards included: written
    # by process 0 after all of them had saved.
    assert files.owned_why(str(two / "model"), "train") == ""
    want, got = _load(one / "model" / "transformer" / "params"), _load(two / "model" / "transformer" / "params")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=WEIGHT_ATOL, err_msg=k)
    # What 2 processes wrote loads in one, as fluxjax generate --model would load it.
    from fluxjax.pipeline.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(two / "model", dtype="float32")  # blocks stacked, as the trainer's
    leaves = jax.tree_util.tree_flatten_with_path(pipe.transformer.params)[0]
    loaded = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
    assert loaded.keys() == got.keys() and all(np.array_equal(loaded[k], got[k]) for k in got)
    halfway = _load(one / "checkpoints" / "step_00000002")
    assert max(np.abs(want[k] - halfway[f"['params']{k}"]).max() for k in want) > 100 * WEIGHT_ATOL  # it trained

    # Resumed from the step-2 checkpoint, the 2 x 4 run ends where it ended uninterrupted.
    losses, weights = (two / "loss.csv").read_text(), got
    state = _load(two / "checkpoints" / "step_00000004")
    kept = (two / "checkpoints" / "step_00000002").stat()
    shutil.rmtree(two / "checkpoints" / "step_00000004")
    _train(data, two, 2, "--resume")
    after = (two / "checkpoints" / "step_00000002").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # resumed from it, not redone
    assert (two / "loss.csv").read_text() == losses
    again = _load(two / "model" / "transformer" / "params")
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    assert all(np.array_equal(v, state[k]) for k, v in _load(two / "checkpoints" / "step_00000004").items())
    assert files.owned_why(str(two / "model"), "train") == ""


@pytest.mark.slow
def test_two_processes_train_a_lora_as_one(runs):
    from safetensors.numpy import load_file

    root, data = runs
    one, two = root / "one" / "lora", root / "two" / "lora"
    lora = ["--lora-rank", "2", "--lora-alpha", "4"]
    _train(data, one, 1, *lora)
    _train(data, two, 2, *lora)
    _assert_same_run(one, two)
    want, got = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=WEIGHT_ATOL, err_msg=k)
    assert max(np.abs(v).max() for k, v in want.items() if "lora_B" in k) > 100 * WEIGHT_ATOL  # B starts at 0


def test_several_processes_without_a_strategy_are_refused_before_loading(tmp_path):
    """Without --sharding the train state would sit on process 0's device alone: every process
    exits 2 with the same one line, and --out is not created."""
    data = make_folder(tmp_path / "data", sizes=((40, 24),) * 2)
    out = tmp_path / "out"
    procs = processes.start_processes(["train", str(data), "--out", str(out), "--steps", "1"], 2,
                                      processes.base_env(devices=1))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("fluxjax train: error: ")]
        assert lines == ["fluxjax train: error: training on 2 processes needs --sharding (e.g. fsdp) to place the "
                         "train state on the devices of all of them"], err[-2000:]
    assert not out.exists() and os.listdir(tmp_path) == ["data"]
