"""Compiled for TPUs on this host (issue 30): the tiny transformer's denoising step under each strategy
goes through the TPU compiler for a TPU topology (libtpu's description, no hardware), with "auto"
attention resolving to splash and a Mosaic kernel (`tpu_custom_call`) for each attention of the
program (the double- and single-stream bodies of the scanned blocks: 2).

libtpu is a large wheel that changes how JAX starts, so it lives in its own environment: the test
runs its compiles in FLUXJAX_TPU_PYTHON (.ci/run makes a venv with `jax[tpu]` over the system's
packages), or in this interpreter when libtpu is importable here. Without either it fails, saying
how to get one: a missing test dependency never passes silently.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tpu_python() -> str:
    found = os.environ.get("FLUXJAX_TPU_PYTHON") or (sys.executable if importlib.util.find_spec("libtpu") else None)
    if not found:
        pytest.fail('no libtpu: set FLUXJAX_TPU_PYTHON to a Python with `pip install "jax[tpu]==<this jax>"` '
                    '(.ci/run makes one: python3 -m venv --system-site-packages .venv-tpu)')
    return found


def run_tpu(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("JAX_PLATFORMS", None)  # plan_tpu chooses the host backend itself
    env.pop("XLA_FLAGS", None)
    return subprocess.run([tpu_python(), "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


COMPILE_ALL = """
    import json, sys
    from fluxjax.plan import tpu as plan_tpu
    from fluxjax.parallel.strategies import Strategy

    out = {}
    for strategy, topology, batch, size, programs, variant in json.loads(sys.argv[1]):
        devices = plan_tpu.topology_devices(topology)
        got = plan_tpu.compile_programs("tiny", Strategy.load(strategy), devices, batch, size, size, 16,
                                        programs=programs, variant=variant)
        for name, g in got.items():
            g["attention"] = plan_tpu.transformer_attention(Strategy.load(strategy), devices)
            out[f"{name}:{strategy}@{topology}" + ("" if variant == "base" else f"/{variant}")] = g
    print(json.dumps(out))
"""

# (strategy, topology, batch, image side, programs); the VAE's programs once, small (their compile
# is the slowest here), the denoising loop and the prompt encoders under every strategy.
CASES = [("fsdp", "v5e:1x1", 1, 64, ["denoise", "encode", "decode", "vae_encode"], "base"),
         ("dp", "v5e:2x2", 4, 128, ["denoise", "encode"], "base"),
         ("fsdp", "v5e:2x2", 4, 128, ["denoise", "encode", "flowedit"], "base"),
         # 8 chips described as 2 hosts of 2x2 in one slice: ICI spans both (tp's data axis is DCN only)
         ("tp", "v6e:2x4", 1, 128, ["denoise", "encode"], "base"),
         ("fsdp_tp", "v6e:2x2", 2, 128, ["denoise", "encode"], "base"),
         ("sp_ulysses", "v5e:2x1", 1, 128, ["denoise"], "base"), ("sp_ring", "v5e:2x2", 1, 128, ["denoise"], "base"),
         ("sp_ulysses_fsdp", "v5e:2x2", 2, 128, ["denoise"], "base"),
         ("sp_ring_fsdp", "v5e:2x2", 2, 128, ["denoise"], "base"),
         ("fsdp", "v5e:2x2", 4, 128, ["denoise"], "kontext"), ("fsdp", "v5e:2x2", 4, 128, ["denoise"], "fill"),
         ("fsdp", "v5e:2x2", 4, 128, ["denoise"], "control")]


@pytest.fixture(scope="module")
def compiled():
    proc = run_tpu(COMPILE_ALL, json.dumps(CASES))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("strategy, topology", [c[:2] for c in CASES if "ring" not in c[0] and c[5] == "base"])
def test_each_strategy_compiles_the_denoising_loop_for_a_tpu_with_a_splash_kernel_per_attention(compiled, strategy,
                                                                                                topology):
    got = compiled[f"denoise:{strategy}@{topology}"]
    assert got["device_kind"].startswith("TPU v")
    assert got["attention"] == "splash"
    assert got["mosaic_kernels"] == 2  # the double- and the single-stream attention (scanned bodies)
    c = got["compiled"]
    assert c["fits"] is True and 0 < c["total_bytes"] <= c["hbm_bytes"]
    assert c["argument_bytes"] > 0 and c["temp_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("key", ["encode:fsdp@v5e:1x1", "encode:fsdp@v5e:2x2", "encode:tp@v6e:2x4",
                                 "decode:fsdp@v5e:1x1", "vae_encode:fsdp@v5e:1x1"])
def test_the_encoders_and_the_vae_compile_for_a_tpu_on_xla_attention(compiled, key):
    # T5's position bias and CLIP's causal mask are masked attention, which splash here does not
    # take: they stay on XLA's attention; the VAE has none of the transformer's attention.
    got = compiled[key]
    assert got["mosaic_kernels"] == 0
    assert got["compiled"]["fits"] is True and got["compiled"]["argument_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["kontext", "fill", "control"])
def test_the_variants_denoising_loops_compile_for_a_tpu_on_splash(compiled, variant):
    got = compiled[f"denoise:fsdp@v5e:2x2/{variant}"]
    base = compiled["denoise:fsdp@v5e:2x2"]
    assert got["mosaic_kernels"] == 2 and got["compiled"]["fits"] is True
    if variant == "kontext":  # the reference's tokens double the sequence: more activations
        assert got["compiled"]["temp_bytes"] > base["compiled"]["temp_bytes"]
    else:  # a wider img_in: more weights
        assert got["compiled"]["argument_bytes"] > base["compiled"]["argument_bytes"]


@pytest.mark.slow
def test_flowedit_compiles_for_a_tpu_with_its_two_loops_on_splash(compiled):
    got = compiled["flowedit:fsdp@v5e:2x2"]
    assert got["mosaic_kernels"] == 4  # the edit loop and the sampling loop, two block kinds each
    assert got["compiled"]["fits"] is True


@pytest.mark.slow
def test_sharded_strategies_communicate_and_one_chip_does_not(compiled):
    assert compiled["denoise:fsdp@v5e:1x1"]["collectives"] == {}
    assert compiled["denoise:fsdp@v5e:2x2"]["collectives"]["all-gather"]["count"] > 0  # each block's weights
    assert compiled["denoise:sp_ulysses@v5e:2x1"]["collectives"]["all-to-all"]["count"] > 0
    assert compiled["denoise:sp_ring@v5e:2x2"]["collectives"]["collective-permute"]["count"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sp_ring", "sp_ring_fsdp"])
def test_ring_attention_runs_each_block_through_splash(compiled, strategy):
    # The ring folds key blocks by their logsumexp; each block's attention is a splash kernel,
    # traced twice per block kind (in the loop of hops and for the last block): 4.
    got = compiled[f"denoise:{strategy}@v5e:2x2"]
    assert got["attention"] == "splash" and got["mosaic_kernels"] == 4 and got["compiled"]["fits"] is True


def test_plan_topology_json_gives_the_tpu_compilers_figures():
    proc = run_tpu("import sys; from fluxjax.commands.cli import main; sys.exit(main())", "plan", "--model", "tiny",
                   "--sharding", "fsdp", "--topology", "v5e:2x2", "--size", "128x128", "--programs", "denoise,encode",
                   "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["topology"] == "v5e:2x2" and report["device_kind"] == "TPU v5 lite" and report["devices"] == 4
    assert report["attention"] == "splash" and report["mosaic_kernels"] == 2
    assert set(report["compiled"]) >= {"argument_bytes", "temp_bytes", "output_bytes", "total_bytes", "hbm_bytes",
                                       "fits", "compile_s"}
    assert report["compiled"]["fits"] is True and report["analytic"]["total_bytes"] > 0
    assert report["collectives"]["all-gather"] > 0
    assert set(report["programs"]) == {"denoise", "encode"} and report["programs"]["denoise"]["compiled"] == report["compiled"]
    assert report["resident"]["fits"] is True and report["resident"]["total_bytes"] > report["resident"]["param_bytes"]
    assert "WARNING" not in proc.stderr  # libtpu's host warnings are held back


def test_plan_topology_quantize_compiles_int8_weights():
    """`plan --topology --quantize int8`: the same programs with int8 weights and float32 scales
    (docs/quantization.md has dev on v5e:1x1), fewer argument bytes than bf16."""
    reports = {}
    for extra in ((), ("--quantize", "int8")):
        proc = run_tpu("import sys; from fluxjax.commands.cli import main; sys.exit(main())", "plan", "--model", "tiny",
                       "--topology", "v5e:1x1", "--size", "128x128", "--programs", "denoise,encode", "--json", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[extra[-1] if extra else None] = json.loads(proc.stdout)
    bf16, int8 = reports[None], reports["int8"]
    assert bf16["quantize"] is None and int8["quantize"] == "int8" and int8["mosaic_kernels"] == 2
    for program in ("denoise", "encode"):
        assert int8["programs"][program]["compiled"]["fits"] is True
        assert int8["programs"][program]["compiled"]["argument_bytes"] < bf16["programs"][program]["compiled"]["argument_bytes"]
    assert int8["resident"]["param_bytes"] < bf16["resident"]["param_bytes"]


def test_a_bad_topology_is_one_line():
    proc = run_tpu("import sys; from fluxjax.commands.cli import main; sys.exit(main())", "plan", "--model", "tiny",
                   "--topology", "v5e-8")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "fluxjax plan: error: --topology 'v5e-8': expected a TPU topology such as v5e:1x1, v5e:2x4, v6e:2x4 or v5p:2x2x1"]


TRAIN = """
    import json, sys
    from fluxjax.plan import tpu as plan_tpu
    from fluxjax.parallel.strategies import Strategy

    devices = plan_tpu.topology_devices("v5e:2x2")
    out = {}
    for rank in (None, 4):
        out[str(rank)] = plan_tpu.compile_train_step("tiny", Strategy.load("fsdp"), devices, 4, 128, 128, 16,
                                                     lora_rank=rank, remat=True)
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_training_step_compiles_for_a_tpu_through_splash_and_its_backward_kernels():
    # fluxjax train's step (AdamW, float32 master weights, bf16 compute, remat), full and LoRA, under
    # fsdp: with remat each attention runs forward twice and its dq and dkv kernels once: 8 Mosaic
    # kernels for the double- and single-stream bodies.
    proc = run_tpu(TRAIN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for rank in ("None", "4"):
        assert got[rank]["mosaic_kernels"] == 8, (rank, got[rank]["mosaic_kernels"])
        assert got[rank]["compiled"]["fits"] is True
        assert got[rank]["collectives"]["all-gather"]["count"] > 0
    # the LoRA step holds no optimizer state or gradient for the base weights
    assert got["4"]["compiled"]["argument_bytes"] < got["None"]["compiled"]["argument_bytes"]
