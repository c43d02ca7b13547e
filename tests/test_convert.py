"""`fluxjax convert`: hub folders and BFL single files to Orbax, strict, atomic, restored into shardings.

A small hub-layout folder is built here (random diffusers/transformers models saved with
save_pretrained, real small tokenizers, a scheduler config); conversions go through the CLI.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from fluxjax.loading.registry import load_clip, load_t5, load_transformer, load_vae
from fluxjax.loading.checkpoint import PARAMS, flat, save_params, write_marker
from fluxjax.commands.cli import main
from fluxjax.config import AutoEncoderConfig
from fluxjax.files import MANIFEST
from fluxjax.testing.reference import MODEL_INDEX, randomize_
from fluxjax.pipeline.tiny_tokenizers import make_tokenizers
from test_t5 import CONFIG_A, hf_config
from test_transformer import CONFIGS, to_bfl
from test_vae import SMALL, bfl_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADERS = {  # hub subfolder -> loader
    "transformer": load_transformer,
    "vae": load_vae,
    "text_encoder": load_clip,
    "text_encoder_2": load_t5,
}
# dev-like with FLUX's head dim 128 (what a BFL file's config is inferred with), 1 head
TRANSFORMER = dict(CONFIGS["dev_like"], attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub-layout folder of small random models, plus BFL single files of the same weights."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    cfg = TRANSFORMER
    transformer = FluxTransformer2DModel(**cfg).eval()
    randomize_(transformer, seed=1)
    transformer.save_pretrained(root / "transformer", max_shard_size="200KB")  # sharded, with an index
    vae = AutoencoderKL(**SMALL).eval()
    randomize_(vae, seed=2)
    vae.save_pretrained(root / "vae")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77,
    )).eval()
    randomize_(clip, seed=3)
    clip.save_pretrained(root / "text_encoder")
    t5 = transformers.T5EncoderModel(hf_config(**CONFIG_A)).eval()
    randomize_(t5, seed=4)
    t5.save_pretrained(root / "text_encoder_2")
    make_tokenizers(root)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    files = root.parent / f"{root.name}_files"
    files.mkdir()
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    bfl = to_bfl(transformer.state_dict(), cfg["num_layers"], cfg["num_single_layers"], d)
    torch_save_file({k: v.contiguous() for k, v in bfl.items()}, str(files / "flux1-test.safetensors"))
    torch_save_file(bfl_state_dict(vae.state_dict(), len(SMALL["block_out_channels"])), str(files / "ae.safetensors"))
    return root, files


def convert_cli(src, dst, *extra, capsys=None):
    """Run `fluxjax convert` in this process: (exit code, stderr)."""
    code = main(["convert", str(src), str(dst), *extra])
    return code, capsys.readouterr().err if capsys else ""


def assert_bit_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{path} differs"


def no_leftovers(dst):
    return not glob.glob(glob.escape(str(dst)) + ".*")


@pytest.fixture(scope="module")
def converted(hub, tmp_path_factory):
    root, _ = hub
    dst = tmp_path_factory.mktemp("out") / "flux-orbax"
    assert main(["convert", str(root), str(dst)]) == 0  # bfloat16, the default
    return dst


@pytest.mark.parametrize("sub", list(LOADERS))
def test_hub_conversion_is_bit_identical_to_safetensors(hub, converted, sub):
    root, _ = hub
    loader = LOADERS[sub]
    model_st, direct = loader(root / sub, dtype="bfloat16")
    model_ob, restored = loader(converted / sub, dtype="bfloat16")
    assert model_ob.config == model_st.config
    assert_bit_identical(restored, direct)
    assert all(x.dtype == np.dtype("bfloat16") for x in flat(restored).values())


def test_hub_layout_is_mirrored_and_self_contained(hub, converted):
    root, _ = hub
    assert sorted(os.listdir(converted)) == sorted(os.listdir(root) + [MANIFEST])  # + the list of what fluxjax wrote
    for sub in LOADERS:
        assert {"fluxjax.json", "params", "config.json"} <= set(os.listdir(converted / sub))
        assert not glob.glob(str(converted / sub / "*.safetensors*"))
    for copied in ("tokenizer", "tokenizer_2", "scheduler"):
        for name in os.listdir(root / copied):
            assert (converted / copied / name).read_bytes() == (root / copied / name).read_bytes()
    assert json.loads((converted / "model_index.json").read_text()) == MODEL_INDEX
    # the converted root stands for its transformer and vae, as the hub folder does for the vae
    _, via_root = load_transformer(converted, dtype="bfloat16")
    _, via_sub = load_transformer(converted / "transformer", dtype="bfloat16")
    assert_bit_identical(via_root, via_sub)
    assert no_leftovers(converted)


def test_bfl_file_and_ae_file(hub, tmp_path, monkeypatch):
    root, files = hub
    # A lone ae.safetensors is read with the "flux" preset; here that preset is the small fixture
    # VAE's config, so the file path is exercised without a full-size VAE.
    small = AutoEncoderConfig.from_hf_config(root / "vae")
    monkeypatch.setattr(AutoEncoderConfig, "presets", staticmethod(lambda: {"flux": small}))
    for name, loader in (("flux1-test.safetensors", load_transformer), ("ae.safetensors", load_vae)):
        dst = tmp_path / name.split(".")[0]
        assert main(["convert", str(files / name), str(dst), "--dtype", "float32"]) == 0
        model_st, direct = loader(files / name)
        model_ob, restored = loader(dst)
        assert model_ob.config == model_st.config
        assert_bit_identical(restored, direct)
        assert json.loads((dst / "fluxjax.json").read_text())["dtype"] == "float32"
    # a float32 checkpoint restored as bfloat16 rounds as loading the file as bfloat16 does
    assert_bit_identical(load_vae(tmp_path / "ae", dtype="bfloat16")[1], load_vae(files / "ae.safetensors", dtype="bfloat16")[1])


def test_params_in_memory_saved_as_a_component(hub, tmp_path):
    """checkpoint.save_params + write_marker: what a fine-tuning run writes; the loader reads it back."""
    root, _ = hub
    model, params = load_clip(root / "text_encoder", dtype="bfloat16")
    save_params(tmp_path / PARAMS, params)
    write_marker(str(tmp_path), "clip", model.config, "bfloat16")
    assert_bit_identical(load_clip(tmp_path, dtype="bfloat16")[1], params)
    with pytest.raises(ValueError, match=r"fluxjax.json: holds a 'clip' component, expected 't5'"):
        load_t5(tmp_path)


def _edited(src, dst, edit):
    tensors = np_load_file(str(src))
    edit(tensors)
    np_save_file(tensors, str(dst))
    return dst


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - 100])
    return dst


BFL = "flux1-test.safetensors"
BAD_FILES = {  # name -> (make(hub root, files folder, tmp) -> SRC, what the one-line error says)
    "truncated": (lambda r, f, t: _truncated(f / BFL, t / BFL), r"flux1-test.safetensors: truncated"),
    "missing_key": (
        lambda r, f, t: _edited(f / BFL, t / BFL, lambda d: d.pop("final_layer.linear.bias")),
        r"flux1-test.safetensors: 1 key\(s\) missing.*final_layer.linear.bias",
    ),
    "wrong_shape": (
        lambda r, f, t: _edited(f / BFL, t / BFL, lambda d: d.__setitem__(
            "double_blocks.1.txt_mlp.2.weight", np.ascontiguousarray(d["double_blocks.1.txt_mlp.2.weight"].T))),
        r"flux1-test.safetensors: tensor 'double_blocks.1.txt_mlp.2.weight' has shape \[512, 128\], expected \[128, 512\]",
    ),
    "wrong_dtype": (
        lambda r, f, t: _edited(f / BFL, t / BFL, lambda d: d.__setitem__(
            "time_in.in_layer.bias", d["time_in.in_layer.bias"].astype(np.int32))),
        r"flux1-test.safetensors: tensor 'time_in.in_layer.bias' has dtype I32, expected one of F16, BF16, F32, F64",
    ),
    "diffusers_folder_as_bfl_file": (
        lambda r, f, t: shutil.copytree(r / "transformer", t / "flux1-dev.safetensors"),
        r"flux1-dev.safetensors: is a folder, expected a single .safetensors file",
    ),
    "diffusers_file_as_bfl_file": (
        lambda r, f, t: shutil.copy(sorted(glob.glob(str(r / "transformer" / "*.safetensors")))[0], t / "flux1-dev.safetensors"),
        r"flux1-dev.safetensors: diffusers-layout transformer weights",
    ),
    "not_safetensors": (lambda r, f, t: shutil.copy(f / BFL, t / "flux1-test.ckpt"), r"flux1-test.ckpt: not a .safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_fails_in_one_line_and_writes_nothing(hub, tmp_path, capsys, case):
    make, pattern = BAD_FILES[case]
    src = make(*hub, tmp_path)
    dst = tmp_path / "out"
    code, err = convert_cli(src, dst, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxjax convert: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert f"{dst} not created" in lines[0]
    assert not dst.exists() and no_leftovers(dst)


def test_existing_dst_refused_unless_overwrite(hub, tmp_path, capsys):
    _, files = hub
    dst = tmp_path / "out"
    assert convert_cli(files / BFL, dst, "--dtype", "float32", capsys=capsys)[0] == 0
    before = tree_bytes(dst)
    code, err = convert_cli(files / BFL, dst, capsys=capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert tree_bytes(dst) == before
    # a failing conversion with --overwrite leaves the old DST as it was
    code, err = convert_cli(_truncated(files / BFL, tmp_path / BFL), dst, "--overwrite", capsys=capsys)
    assert code == 2 and f"{dst} left as it was" in err
    assert tree_bytes(dst) == before
    assert convert_cli(files / BFL, dst, "--overwrite", capsys=capsys)[0] == 0
    assert json.loads((dst / "fluxjax.json").read_text())["dtype"] == "bfloat16" and no_leftovers(dst)
    assert_bit_identical(load_transformer(dst, dtype="bfloat16")[1], load_transformer(files / BFL, dtype="bfloat16")[1])


def tree_bytes(folder):
    """{relative path: bytes (files) or None (folders) or link target} of everything under `folder`."""
    out = {}
    for base, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            out[rel] = ("link", os.readlink(path)) if os.path.islink(path) else (
                None if os.path.isdir(path) else open(path, "rb").read())
    return out


def one_line_error(err, command="convert"):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fluxjax {command}: error: "), err
    return lines[0][len(f"fluxjax {command}: error: "):]


def test_overwrite_refuses_what_fluxjax_did_not_write(hub, tmp_path, capsys, monkeypatch):
    """Issue 14 items 1 and 5: a project folder, SRC itself, SRC's parent, a folder inside SRC,
    a file and a link are refused in one line, each surviving byte for byte."""
    root, files = hub
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "src" / "main.py").write_text("print(1)")
    os.symlink("notes.txt", project / "link")
    parent = tmp_path / "parent"
    shutil.copytree(root / "vae", parent / "dev")
    (parent / "sibling.txt").write_text("sibling")
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"\x00\x01")
    a_link = tmp_path / "link-to-project"
    os.symlink(project, a_link)
    cases = [  # (cwd, SRC, DST, the message after "error: ")
        (project, root, ".", f"{project}: already exists and was not written by fluxjax convert (no fluxjax.json or "
                             "model_index.json in it); fluxjax replaces only its own folders: choose another DST"),
        (None, parent / "dev", parent, f"{parent}: holds the source {parent / 'dev'}; write the conversion to another folder"),
        (None, parent / "dev", parent / "dev", f"{parent / 'dev'}: is the source itself; write the conversion to another folder"),
        (None, parent / "dev", parent / "dev" / "out", f"{parent / 'dev' / 'out'}: is inside the source {parent / 'dev'}; "
                                                      "write the conversion to another folder"),
        (None, files / BFL, a_file, f"{a_file}: is a file; fluxjax writes a new folder, or replaces one it wrote: "
                                    "remove it or choose another DST"),
        (None, files / BFL, a_link, f"{a_link}: is a symbolic link; fluxjax writes a new folder, or replaces one it "
                                    "wrote, never a link: remove it or choose another DST"),
    ]
    # a converted folder the user added a file to is no longer only fluxjax's
    mixed = tmp_path / "mixed"
    assert convert_cli(root / "vae", mixed, capsys=capsys)[0] == 0
    (mixed / "my-notes.txt").write_text("keep")
    cases.append((None, root / "vae", mixed, f"{mixed}: already exists and was not written by fluxjax convert (it holds "
                                             "my-notes.txt, which fluxjax does not write); fluxjax replaces only its own "
                                             "folders: choose another DST"))
    before = {p: tree_bytes(p) for p in (project, parent, mixed)}
    file_bytes = a_file.read_bytes()
    for cwd, src, dst, message in cases:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        code, err = convert_cli(src, dst, "--overwrite", capsys=capsys)
        assert code == 2 and one_line_error(err) == message, (dst, err)
        monkeypatch.chdir(tmp_path)
        assert {p: tree_bytes(p) for p in before} == before and a_file.read_bytes() == file_bytes
        assert os.readlink(a_link) == str(project) and not glob.glob(str(tmp_path / "*.converting-*"))


def test_invalid_config_json_is_named(hub, tmp_path, capsys):
    """Issue 14 item 11."""
    root, _ = hub
    folder = tmp_path / "vae"
    shutil.copytree(root / "vae", folder)
    (folder / "config.json").write_text("{not json")
    code, err = convert_cli(folder, tmp_path / "out", capsys=capsys)
    assert code == 2
    assert one_line_error(err).startswith(f"{folder / 'config.json'}: not readable as JSON (Expecting property name")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path / "out")


def test_a_fifo_weights_file_is_refused_not_opened(hub, tmp_path):
    """N180: a weights file that is a FIFO would block its open forever; it is refused by its stat
    (a subprocess with a timeout, so that a regression fails instead of hanging)."""
    root, _ = hub
    folder = tmp_path / "vae"
    shutil.copytree(root / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "fluxjax.commands.cli", "convert", str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"fluxjax convert: error: {weights}: is a FIFO (named pipe), not a regular file; refusing to open it "
        f"({tmp_path / 'out'} not created)"]
    assert sorted(os.listdir(tmp_path)) == ["vae"]


def test_overlapping_safetensors_offsets_are_refused(tmp_path, capsys):
    """Issue 14 item 12: the byte ranges of the tensors must tile the data section."""
    import struct

    bad = tmp_path / "ae.safetensors"
    np_save_file({"decoder.a": np.ones(4, np.float32), "decoder.b": np.zeros(4, np.float32)}, str(bad))
    data = bad.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    first, second = "decoder.a", "decoder.b"
    header[second]["data_offsets"] = header[first]["data_offsets"]  # two tensors on the same bytes
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    code, err = convert_cli(bad, tmp_path / "out", capsys=capsys)
    assert code == 2
    assert one_line_error(err).startswith(f"{bad}: corrupt: tensor {second!r} starts at byte 0 of the data and "
                                          f"overlaps tensor {first!r}")
    assert not (tmp_path / "out").exists()


KILL_SCRIPT = """
import os, signal, sys
import fluxjax.loading.checkpoint as checkpoint
from fluxjax.commands.cli import main
from fluxjax.config import AutoEncoderConfig

add, seen = checkpoint.ParamsWriter.add, []
def add_then_die(self, path, value):
    seen.append(path)
    if len(seen) == 12:  # mid-write: some leaves saved, the rest not
        os.kill(os.getpid(), signal.{signal})
    add(self, path, value)
checkpoint.ParamsWriter.add = add_then_die
sys.exit(main(["convert", {src!r}, {dst!r}]))
"""


def _run_killed(src, dst, sig):
    script = textwrap.dedent(KILL_SCRIPT).format(signal=sig, src=str(src), dst=str(dst))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_conversion_leaves_no_dst(hub, tmp_path):
    root, _ = hub
    dst = tmp_path / "out"
    term = _run_killed(root, dst, "SIGTERM")
    assert term.returncode == 130, term.stderr
    assert f"fluxjax convert: interrupted; {dst} not created" in term.stderr
    assert not dst.exists() and no_leftovers(dst)

    kill = _run_killed(root, dst, "SIGKILL")
    assert kill.returncode == -9
    assert not dst.exists()
    assert glob.glob(str(dst) + ".converting-*")  # what SIGKILL leaves: the staging folder, never DST
    # the next conversion to the same DST clears the dead one's staging folder
    assert main(["convert", str(root / "vae"), str(dst)]) == 0
    assert no_leftovers(dst)


SHARDED_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
import flax.linen as nn
from fluxjax.loading.checkpoint import PARAMS, flat, save_params, write_marker
from fluxjax.loading.registry import load_t5, load_transformer
from fluxjax.models.flux import param_shapes
from fluxjax.models.t5 import param_shapes as t5_param_shapes

HUB, DST = sys.argv[1:]
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
RULES = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "qkv": "tensor", "modulation": "tensor"}

def spec(names):
    # a mesh axis shards at most one dimension: a repeated logical name (embed, embed) is replicated
    axes = [RULES.get(n) for n in names]
    return jax.sharding.PartitionSpec(*(a if a not in axes[:i] else None for i, a in enumerate(axes)))

def sharding(boxed):
    return jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, spec(x.names)), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

qkv = None
for loader, shapes_of, src in ((load_transformer, param_shapes, HUB + "/transformer"),
                               (load_transformer, param_shapes, DST),
                               (load_t5, t5_param_shapes, HUB + "/text_encoder_2"),
                               (load_t5, t5_param_shapes, DST + "/text_encoder_2")):
    _, one = loader(src, dtype="bfloat16")
    model, many = loader(src, dtype="bfloat16", sharding=sharding)
    expected = flat(sharding(shapes_of(model)))
    one, many = flat(one), flat(many)
    assert sorted(one) == sorted(many) == sorted(expected)
    for path, arr in many.items():
        assert arr.sharding == expected[path], (path, arr.sharding, expected[path])
        shard = expected[path].shard_shape(arr.shape)
        assert len(arr.addressable_shards) == 8, path
        assert all(s.data.shape == shard for s in arr.addressable_shards), path
        assert np.array_equal(np.asarray(arr).view(np.uint8), np.asarray(one[path]).view(np.uint8)), path
    if "double_blocks/img_attn/qkv/kernel" in many:
        qkv = many["double_blocks/img_attn/qkv/kernel"]
        print("qkv", qkv.shape, tuple(qkv.sharding.spec), qkv.addressable_shards[0].data.shape)
"""


def test_restore_into_shardings_on_8_devices(hub, converted):
    root, _ = hub
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(root), str(converted)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # (layers, embed, qkv) -> (None, fsdp, tensor): each device holds a quarter of embed, half of qkv
    assert "qkv (2, 128, 384) (None, 'fsdp', 'tensor') (2, 32, 192)" in out.stdout, out.stdout


REPLACE_KILL_SCRIPT = """
import os, signal, sys
import fluxjax.files as folders
from fluxjax.commands.cli import main

STEP, SRC, DST = sys.argv[1:]
exchange, unlink, swapped, unlinked = folders.exchange, os.unlink, [], []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def exchange_then_die(a, b):
    if b != DST:  # the filesystem probe before the conversion
        return exchange(a, b)
    if STEP == "before_swap":  # the new folder complete beside the old DST
        die()
    exchange(a, b)
    swapped.append(a)
    if STEP == "after_swap":  # DST is the new folder, the old one not yet removed
        die()

def unlink_then_die(*args, **kw):
    if swapped:
        unlinked.append(args)
        if len(unlinked) == 3:  # the old DST half removed
            die()
    unlink(*args, **kw)

folders.exchange, os.unlink = exchange_then_die, unlink_then_die
sys.exit(main(["convert", SRC, DST, "--overwrite"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["before_swap", "after_swap", "mid_removal"])
def test_sigkill_during_replacement_leaves_old_or_new_dst(hub, tmp_path, capsys, step):
    """Issue 14 items 1 and 4: SIGKILL at each step of --overwrite's replacement leaves DST whole
    (the old one or the new one), and the next run removes and reports what the kill left."""
    root, _ = hub
    dst = tmp_path / "vae-orbax"
    assert convert_cli(root / "vae", dst, "--dtype", "float32", capsys=capsys)[0] == 0
    old = tree_bytes(dst)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", REPLACE_KILL_SCRIPT, step, str(root / "vae"), str(dst)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    left = glob.glob(str(dst) + ".converting-*")
    assert len(left) == 1  # the new folder (before the swap) or the old DST (after it)
    if step == "before_swap":
        assert tree_bytes(dst) == old
        assert json.loads(open(os.path.join(left[0], "fluxjax.json")).read())["dtype"] == "bfloat16"  # new, complete
    else:  # swapped: DST is the complete new conversion
        assert json.loads((dst / "fluxjax.json").read_text())["dtype"] == "bfloat16"
        assert_bit_identical(load_vae(dst, dtype="bfloat16")[1], load_vae(root / "vae", dtype="bfloat16")[1])
    code, err = convert_cli(root / "vae", dst, "--overwrite", capsys=capsys)
    assert code == 0
    assert f"removing {left[0]}, left by an interrupted conversion (process " in err
    assert no_leftovers(dst)
    assert_bit_identical(load_vae(dst, dtype="bfloat16")[1], load_vae(root / "vae", dtype="bfloat16")[1])


@pytest.fixture(scope="module")
def pipeline_hub(tmp_path_factory):
    """A small dev-like hub folder whose components fit together (fluxjax.testing.reference)."""
    from fluxjax.testing.reference import make_hub_pipeline

    root = tmp_path_factory.mktemp("pipeline_hub")
    make_hub_pipeline(root, "dev")
    return root


@pytest.mark.slow
def test_readme_workflow_with_relative_paths(pipeline_hub, tmp_path, monkeypatch, capsys):
    """Issue 14 item 2: `fluxjax convert M conv/m && fluxjax generate ... --model conv/m`, batch and
    the loaders, all with paths relative to the working folder."""
    root = pipeline_hub
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root, "M")
    assert main(["convert", "M", "conv/m"]) == 0
    size = ["--height", "32", "--width", "32", "--steps", "1"]
    assert main(["generate", "a cat", "--model", "conv/m", "--out", "cat.png", *size]) == 0
    assert Image.open("cat.png").text["model"] == "m"
    (tmp_path / "p.txt").write_text("a dog\n")
    assert main(["batch", "p.txt", "--out-dir", "out", "--model", "conv/m", *size]) == 0
    assert sorted(os.listdir("out")) == ["000000.png", "manifest-00000.jsonl"]
    assert_bit_identical(load_transformer("conv/m/transformer", dtype="bfloat16")[1],
                         load_transformer(root / "transformer", dtype="bfloat16")[1])
    capsys.readouterr()


@pytest.mark.parametrize("damage", ["deleted", "truncated", "zeroed"])
def test_damaged_orbax_data_is_one_line_naming_component_and_parameter(pipeline_hub, tmp_path, capsys, damage):
    """Issue 14 item 3: a data file of a converted component deleted, truncated or zeroed."""
    converted = tmp_path / "m"
    assert main(["convert", str(pipeline_hub), str(converted)]) == 0
    copy = tmp_path / "damaged"
    shutil.copytree(converted, copy)
    files = glob.glob(str(copy / "transformer" / PARAMS / "state" / "ocdbt.process_*" / "d" / "*"))
    victim = max(files, key=os.path.getsize)
    size = os.path.getsize(victim)
    if damage == "deleted":
        os.remove(victim)
    else:
        with open(victim, "r+b") as f:
            f.truncate(size // 2) if damage == "truncated" else f.write(bytes(size))
    code = main(["generate", "a cat", "--model", str(copy), "--out", str(tmp_path / "cat.png"), "--height", "32",
                 "--width", "32", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "TensorStore" not in err
    message = err.strip().splitlines()[-1]
    folder = copy / "transformer" / PARAMS
    match = re.fullmatch(rf"fluxjax generate: error: {re.escape(str(folder))}: parameter (\S+) cannot be read \((.+)\); "
                         r"the checkpoint is damaged or incomplete: convert it again", message)
    assert match, message
    assert match.group(1) in flat(load_transformer(converted, dtype="bfloat16")[1])
    assert not (tmp_path / "cat.png").exists()


def test_leftovers_of_dead_conversions_are_removed_and_reported(hub, tmp_path, capsys):
    """Issue 14 item 4: `.converting-PID` and `.replaced-PID` (what the two-rename replacement of
    earlier versions left) of processes that are gone; a live process's staging folder is kept."""
    root, _ = hub
    dst = tmp_path / "vae-orbax"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    for suffix in (f".converting-{dead}", f".replaced-{dead}", f".converting-{live.pid}"):
        (tmp_path / f"vae-orbax{suffix}" / "params").mkdir(parents=True)
        (tmp_path / f"vae-orbax{suffix}" / "params" / "x").write_bytes(b"half")
    try:
        code, err = convert_cli(root / "vae", dst, capsys=capsys)
    finally:
        live.kill()
        live.wait()
    assert code == 0
    for suffix in (".converting-", ".replaced-"):
        assert f"removing {dst}{suffix}{dead}, left by an interrupted conversion (process {dead})" in err
    # a running conversion's staging folder is its own, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae-orbax", f"vae-orbax.converting-{live.pid}"]
