"""The benchmark harness: the FLOP count MFU is based on, and the full-size section run on CPU."""

import json

import pytest

from fluxjax.commands import cli
from fluxjax.bench import fullsize
from fluxjax.config import FluxConfig


def test_flops_of_a_dev_step_match_the_reference_count():
    # docs/model-reference.md, "Forward pass": 74.4 TFLOP per dev step at 1024x1024 (4096 + 512 tokens).
    flops = fullsize.step_flops(FluxConfig.preset("dev"), 1, 4096, 512)
    assert flops == pytest.approx(74.4e12, rel=1e-3)
    assert fullsize.step_flops(FluxConfig.preset("dev"), 4, 4096, 512) == pytest.approx(4 * flops)


def test_flops_of_a_klein_step_count_the_swiglu_gate():
    """FLUX.2's MLP-in Linear gives gate and value (cfg.mlp_up_dim = 2 x mlp_hidden_dim): the gate's
    extra FLOPs are 2 L D M per block (in a double block each of the L tokens goes through its own
    stream's MLP)."""
    klein, tokens = FluxConfig.preset("flux2-klein-4b"), 4096 + 512
    extra = fullsize.step_flops(klein, 1, 4096, 512) - fullsize.step_flops(klein.replace(mlp="gelu"), 1, 4096, 512)
    assert extra == 2 * tokens * klein.hidden_size * klein.mlp_hidden_dim * (klein.depth + klein.depth_single_blocks)


def test_fullsize_harness_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(out), "fullsize"]) == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "compile" in printed
    results = json.loads(out.read_text())["sections"]["fullsize"]
    steps = [r for r in results if r["name"].endswith(": step")]
    assert len(steps) == 2 and all(r["fluxjax"] > 0 and r["unit"] == "ms" for r in steps)


def test_endtoend_harness_runs_on_cpu_beside_diffusers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(out), "endtoend", "--batches", "1", "--compare-diffusers",
                     "--diffusers-modes", "eager"]) == 0
    printed = capsys.readouterr().out
    assert "s/image" in printed and "auto (= " in printed
    results = {r["name"]: r for r in json.loads(out.read_text())["sections"]["endtoend"]}
    ours = [r for name, r in results.items() if name.startswith("fluxjax tiny") and name.endswith("per image")]
    theirs = [r for name, r in results.items() if name.startswith("diffusers eager tiny") and name.endswith("per image")]
    assert len(ours) == len(theirs) == 1 and ours[0]["fluxjax"] > 0 and theirs[0]["fluxjax"] > 0
    assert any(name.endswith("first call (compile)") for name in results)
