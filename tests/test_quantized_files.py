"""The quantized FLUX files people share: city96's GGUF transformers and ComfyUI/Kijai fp8 safetensors.

The reference is the `gguf` package (llama.cpp's gguf-py, the `test` extra): its numpy
`gguf.quants.dequantize` defines each GGML type's values and its `GGUFWriter` writes the files.
Every check compares float32 bit patterns: the GGML types on random raw blocks (every bit pattern
of the quants, finite float16 scales), the tensors read from a FLUX-keyed GGUF holding every type
city96 publishes, and the model loaded from it against the model loaded from a float32
safetensors file of the reference's dequantized weights. The fp8 files are written by torch.
"""

import os
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from fluxjax.commands.cli import main
from fluxjax.config import FluxConfig
from fluxjax.errors import CheckpointError
from fluxjax.loading import flux, ggml, registry
from fluxjax.loading.gguf import GGUFSource
from fluxjax.loading.registry import load_transformer
from fluxjax.loading.table import key_shapes
from test_convert import assert_bit_identical

Q = gguf.GGMLQuantizationType
# FLUX's head dim 128 (what a single file's config is inferred with), widths of the tiny pipeline
# (make_hub_pipeline's text width 32); mlp 512 and the 256-wide embedders give K-quant rows.
CFG = FluxConfig(vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=1, depth=2,
                 depth_single_blocks=1, axes_dim=(16, 56, 56), guidance_embed=True)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf-py dequantizes these only
BLOCK_QUANTS = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16)  # gguf-py quantizes these
# Byte offsets of each type's float16 scales in its block (ggml-common.h): set to finite values,
# every other byte random.
SCALE_BYTES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
               Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
FLATTENED = "vector_in.in_layer.weight"  # [128, 32], stored as [16, 256] Q4_K with its orig_shape


def bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def random_blocks(rng, qtype, rows, cols):
    """Raw bytes of a (rows, cols) tensor of `qtype`: random quants, finite random float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in SCALE_BYTES[qtype]:
        raw[..., at:at + 2] = (rng.standard_normal(raw.shape[:2]) * 0.02).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def bfl_weights(cfg, seed=0):
    """Random float32 tensors under every key of a BFL single file of `cfg` (the loader's own table)."""
    model = registry.build("transformer", cfg)
    shapes = key_shapes(flux.bfl_rules(cfg), registry.abstract_params("transformer", model))
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) > 1:
            out[key] = noise / np.sqrt(shape[-1])
        else:  # norm scales near 1, biases near 0
            out[key] = 1 + 0.3 * noise if key.endswith("scale") else 0.3 * noise
    return out


def write_gguf(path, weights, seed=0, arch="flux", flattened=FLATTENED):
    """A FLUX GGUF of `weights` with every type city96 publishes; returns {key: (type, reference values)}."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    k_keys = [k for k, w in weights.items() if w.ndim == 2 and w.shape[1] % 256 == 0]
    assert len(k_keys) >= len(K_QUANTS)
    written, others = {}, 0
    for key, w in weights.items():
        if key == flattened:
            qtype, raw = Q.Q4_K, random_blocks(rng, Q.Q4_K, w.size // 256, 256)
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(w.shape))
        elif key in k_keys:
            qtype = K_QUANTS[k_keys.index(key) % len(K_QUANTS)]
            raw = random_blocks(rng, qtype, *w.shape)
        elif w.ndim == 2:
            qtype = BLOCK_QUANTS[others % len(BLOCK_QUANTS)]
            others += 1
            raw = gguf.quants.quantize(w, qtype)
        else:
            qtype, raw = Q.F32, w
        writer.add_tensor(key, raw, raw_dtype=qtype)
        values = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(w.shape)
        written[key] = (qtype, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """flux.gguf and ref.safetensors: the reference's dequantized values of every tensor, float32."""
    folder = tmp_path_factory.mktemp("quantized")
    written = write_gguf(folder / "flux.gguf", bfl_weights(CFG))
    np_save_file({k: v for k, (_, v) in written.items()}, str(folder / "ref.safetensors"))
    return folder, written


# --- GGML types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [t.name for t in ggml.TYPES.values()])
def test_each_ggml_type_dequantizes_as_the_reference_bit_for_bit(name, monkeypatch):
    qtype, rng = Q[name], np.random.default_rng(7)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in SCALE_BYTES:
        raw = random_blocks(rng, qtype, 3, 40 * block)
    else:  # F32, F16, BF16: finite values of every magnitude
        values = (rng.standard_normal((3, 40)) * 10.0 ** rng.integers(-6, 4, (3, 40))).astype(np.float32)
        stored = {4: np.float32, 2: np.float16}[size]
        raw = gguf.quants.quantize(values, qtype) if qtype == Q.BF16 else values.astype(stored)
        raw = raw.view(np.uint8)
    reference = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    monkeypatch.setattr(ggml, "CHUNK", 7 * block)  # chunks that do not divide the tensor
    mine = ggml.dequantize(raw.reshape(-1), ggml.TYPES[int(qtype)])
    assert mine.dtype == np.float32 and mine.shape == reference.shape
    assert np.array_equal(bits(mine), bits(reference))


def test_every_city96_type_is_read():
    assert {t.name for t in ggml.TYPES.values()} == {
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    for t in ggml.TYPES.values():  # ids and block sizes as GGML has them
        assert gguf.GGML_QUANT_SIZES[Q(t.id)] == (t.block, t.block_bytes) and Q(t.id).name == t.name


# --- GGUF files -----------------------------------------------------------------------------------

def test_gguf_tensors_read_as_the_reference_in_their_pytorch_shapes(files):
    folder, written = files
    source = GGUFSource(folder / "flux.gguf")
    assert sorted(source.keys()) == sorted(written) and source.architecture == "flux"
    types = set()
    for key, (qtype, values) in written.items():
        got = source.read(key)
        assert got.shape == values.shape, key  # GGUF stores dims reversed; [128, 512] etc. are not square
        assert source.ggml_type(key) == qtype.name
        assert np.array_equal(bits(got.astype(np.float32)), bits(values)), key
        types.add(qtype.name)
    assert types == {t.name for t in ggml.TYPES.values()}
    assert source.shape(FLATTENED) == (128, 32)  # from comfy.gguf.orig_shape, not the stored [16, 256]


def test_model_from_gguf_equals_model_from_its_dequantized_safetensors(files):
    folder, _ = files
    model_q, from_gguf = load_transformer(folder / "flux.gguf", dtype="float32")
    model_f, from_ref = load_transformer(folder / "ref.safetensors", dtype="float32")
    assert model_q.config == model_f.config == CFG
    assert_bit_identical(from_gguf, from_ref)
    # in bfloat16 each float32 value is rounded once, as the float32 file's are
    assert_bit_identical(load_transformer(folder / "flux.gguf", dtype="bfloat16")[1],
                load_transformer(folder / "ref.safetensors", dtype="bfloat16")[1])


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A small hub folder whose encoders and VAE fit CFG's widths."""
    from fluxjax.testing.reference import make_hub_pipeline

    root = tmp_path_factory.mktemp("hub")
    make_hub_pipeline(root, "dev", attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56))
    return root


def test_pipeline_takes_a_gguf_transformer(files, hub):
    from fluxjax import FluxPipeline

    folder, root = files[0], hub
    pipe = FluxPipeline.from_pretrained(root, transformer=folder / "flux.gguf")
    ref = FluxPipeline.from_pretrained(root, transformer=folder / "ref.safetensors")
    assert pipe.transformer.model.config == CFG and pipe.name == "flux.gguf"
    assert_bit_identical(pipe.transformer.params, ref.transformer.params)


def test_generate_takes_a_gguf_transformer(files, hub, tmp_path, capsys):
    png = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(hub), "--transformer", str(files[0] / "flux.gguf"),
                 "--out", str(png), "--width", "64", "--height", "64", "--steps", "1", "--dtype", "float32"]) == 0
    assert png.is_file() and "flux.gguf, 1 steps" in capsys.readouterr().err  # the model it ran, named


def test_convert_reads_a_gguf(files, tmp_path):
    folder, _ = files
    assert main(["convert", str(folder / "flux.gguf"), str(tmp_path / "out")]) == 0
    assert_bit_identical(load_transformer(tmp_path / "out", dtype="bfloat16")[1],
                load_transformer(folder / "flux.gguf", dtype="bfloat16")[1])


def plain_gguf(path, tensors, arch):
    """A float32 GGUF of `tensors`; arch None: without general.architecture (GGUFWriter always
    writes one, so its key is renamed in place)."""
    writer = gguf.GGUFWriter(str(path), arch=arch or "none")
    for key, value in tensors.items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if arch is None:
        path.write_bytes(path.read_bytes().replace(b"general.architecture", b"general.architecturX"))


def patched(src, dst, at, value: bytes):
    data = bytearray(src.read_bytes())
    data[at:at + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


def type_id_at(data: bytes, name: str) -> int:
    """The byte offset of tensor `name`'s GGML type id in a GGUF header."""
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


KEY = "double_blocks.0.img_attn.qkv.weight"


@pytest.mark.parametrize("case", ["llama", "sd_keys", "truncated", "truncated_header", "unknown_type",
                                  "unread_type", "bad_magic", "bad_version"])
def test_bad_gguf_is_one_line_naming_the_file(files, tmp_path, case):
    folder, written = files
    good = folder / "flux.gguf"
    path = tmp_path / "bad.gguf"
    if case == "llama":
        plain_gguf(path, {"token_embd.weight": np.ones((4, 64), np.float32)}, arch="llama")
        want = f"{path}: a GGUF of a 'llama' model (general.architecture); expected 'flux' or 'pig'"
    elif case == "sd_keys":  # no architecture (stable-diffusion.cpp): judged by its keys
        plain_gguf(path, {"down_blocks.0.resnets.0.conv1.weight": np.ones((8, 32), np.float32)}, arch=None)
        want = f"{path}: not a BFL FLUX transformer file (no key 'img_in.weight')"
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
        source = GGUFSource(good)
        last = max(written, key=lambda k: source._tensors[k][2])
        kind, shape, begin, nbytes = source._tensors[last]
        want = (f"{path}: truncated: tensor {last!r} ({kind.name}, shape {list(shape)}) ends at byte "
                f"{begin + nbytes}, the file has {os.path.getsize(good) - 100}")
    elif case == "truncated_header":
        assert GGUFSource(good).data_start > 2000
        path.write_bytes(good.read_bytes()[:2000])
        want = f"{path}: truncated: the GGUF header runs past the end of the file (2000 bytes)"
    elif case in ("unknown_type", "unread_type"):
        type_id, what = (99, "unknown GGML type id 99") if case == "unknown_type" else (16, "GGML type IQ2_XXS")
        patched(good, path, type_id_at(good.read_bytes(), KEY), struct.pack("<I", type_id))
        want = (f"{path}: tensor {KEY!r} has {what}; fluxjax reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                "Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K")
    elif case == "bad_magic":
        patched(good, path, 0, b"GGML")
        want = f"{path}: not a GGUF file (it starts with b'GGML', a GGUF file with b'GGUF')"
    else:
        patched(good, path, 4, struct.pack("<I", 1))
        want = f"{path}: GGUF version 1; fluxjax reads versions 2 and 3"
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    assert str(e.value) == want and "\n" not in want


def test_cli_refuses_a_bad_gguf_in_one_line(files, hub, tmp_path, capsys):
    folder, _ = files
    bad = tmp_path / "bad.gguf"
    bad.write_bytes((folder / "flux.gguf").read_bytes()[:-100])
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}: truncated: tensor" in err and not out.exists()
    png = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", str(hub), "--transformer", str(bad), "--out", str(png)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the line saying what it loads
    assert last.startswith(f"fluxjax generate: error: {bad}: truncated: tensor") and not png.exists()


# --- fp8 safetensors ------------------------------------------------------------------------------

def fp8_file(path, weights, scaled: bool, prefix=""):
    """A ComfyUI/Kijai-style fp8 file of `weights` (torch-written); returns the float32 values it holds.

    2-D weights in float8_e4m3fn, every third in float8_e5m2; with `scaled`, every other weight has
    a scale_weight (shapes [] and [1]), one a scale_input, and the empty scaled_fp8 marker is added.
    Other tensors in bfloat16.
    """
    tensors, expected = {}, {}
    for i, (key, w) in enumerate(weights.items()):
        t = torch.from_numpy(w)
        if w.ndim != 2:
            tensors[prefix + key] = t.to(torch.bfloat16)
            expected[key] = tensors[prefix + key].float().numpy()
            continue
        fp8 = torch.float8_e5m2 if i % 3 == 0 else torch.float8_e4m3fn
        if scaled and i % 2:
            scale = torch.tensor(float(np.abs(w).max()) / 200.0, dtype=torch.float32)
            scale = scale.reshape(() if i % 4 == 1 else (1,))
            tensors[prefix + key] = (t / scale).to(fp8)
            tensors[prefix + key.replace(".weight", ".scale_weight")] = scale
            expected[key] = tensors[prefix + key].float().numpy() * np.float32(scale.item())
        else:
            tensors[prefix + key] = t.to(fp8)
            expected[key] = tensors[prefix + key].float().numpy()
    if scaled:
        tensors[prefix + "scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
        tensors[prefix + KEY.replace(".weight", ".scale_input")] = torch.tensor(1.5)
    torch_save_file(tensors, str(path))
    return expected


@pytest.mark.parametrize("scaled", [False, True], ids=["cast", "scale_weight"])
def test_fp8_file_loads_as_its_float32_values(tmp_path, scaled):
    weights = bfl_weights(CFG, seed=3)
    prefix = "model.diffusion_model." if scaled else ""
    expected = fp8_file(tmp_path / "flux-fp8.safetensors", weights, scaled, prefix)
    np_save_file(expected, str(tmp_path / "ref.safetensors"))
    model, params = load_transformer(tmp_path / "flux-fp8.safetensors", dtype="float32")
    assert model.config == CFG
    assert_bit_identical(params, load_transformer(tmp_path / "ref.safetensors", dtype="float32")[1])
    if scaled:  # fluxjax convert reads it through the same reader
        assert main(["convert", str(tmp_path / "flux-fp8.safetensors"), str(tmp_path / "out")]) == 0
        assert_bit_identical(load_transformer(tmp_path / "out", dtype="bfloat16")[1],
                    load_transformer(tmp_path / "ref.safetensors", dtype="bfloat16")[1])


@pytest.mark.parametrize("extra, want", [
    ({"img_out.scale_weight": torch.tensor(2.0)}, "tensor 'img_out.scale_weight' scales no weight "
                                                  "('img_out.weight' is not in the file)"),
    ({"img_in.scale_weight": torch.ones(3)}, "tensor 'img_in.scale_weight' is F32 of shape [3]; "
                                             "fluxjax reads one float per weight (F32, F16, BF16)"),
], ids=["orphan", "per_channel"])
def test_bad_fp8_scale_is_one_line_naming_the_tensor(tmp_path, extra, want):
    path = tmp_path / "flux-fp8.safetensors"
    tensors = {k: torch.from_numpy(w).to(torch.float8_e4m3fn) for k, w in bfl_weights(CFG, seed=3).items()}
    torch_save_file({**tensors, **extra}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    assert str(e.value) == f"{path}: {want}"
