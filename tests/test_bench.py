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


def test_bench_tpu_matrix_cases_and_table_markers(tmp_path, capsys):
    # `fluxjax bench tpu --full`: issue 30's matrix (one-chip slices compile fsdp, the program every
    # strategy is there; 4096 with sequence parallelism only); the table goes between the markers
    # of docs/tpu.md and leaves the rest of the file as it was; a bad --case is one line.
    from fluxjax.bench import tpu

    cases = tpu.full_matrix()
    assert len(cases) == len({tpu.key(c) for c in cases}) == 2 * (2 * 4 + 5 * (4 * 2 * 2 + 4 * 3 * 2))
    assert {c["strategy"] for c in cases if c["slice"] in ("v5e-1", "v6e-1")} == {"fsdp"}
    assert all(c["strategy"] in tpu.SP for c in cases if c["size"] == 4096)
    assert tpu.parse_case("dev v5e-256 fsdp 1024 4") == dict(model="dev", slice="v5e-256", strategy="fsdp", size=1024,
                                                             per_shard=4)
    doc = tmp_path / "tpu.md"
    doc.write_text(f"intro\n{tpu.BEGIN}\nold table\n{tpu.END}\nafter\n")
    done = {tpu.key(cases[0]): {}}
    tpu.write_table(str(doc), tpu.format_table([], "abc", "host", tpu.missing_lines(cases[:3], done), 3, "c.jsonl"))
    text = doc.read_text()
    assert text.startswith(f"intro\n{tpu.BEGIN}\n") and text.endswith(f"{tpu.END}\nafter\n") and "old table" not in text
    assert f"- dev v5e-1 (2): {cases[1]['strategy']} {cases[1]['size']} x{cases[1]['per_shard']}" in text
    assert cli.main(["bench", "tpu", "--case", "dev v5e-8 fsdp"]) == 2
    assert capsys.readouterr().err.strip().endswith("--case 'dev v5e-8 fsdp': expected 'MODEL SLICE STRATEGY SIZE "
                                                    "PER_SHARD', e.g. 'dev v5e-8 fsdp 1024 1' (slices: v5e-1, v6e-1, "
                                                    "v5e-8, v6e-8, v5p-8, v5e-256, v5p-128; strategies: dp, fsdp, tp, "
                                                    "fsdp_tp, sp_ulysses, sp_ring, sp_ulysses_fsdp, sp_ring_fsdp)")
