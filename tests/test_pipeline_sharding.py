"""FluxPipeline(sharding=...) on 8 simulated CPU devices gives the single-device image.

The work runs in tests/pipeline_sharding_worker.py (a subprocess: the device count is fixed
when jax is imported) on a hub-layout fixture saved here; this file checks its facts.
Limit: fp32 pixels within 1e-5 of one device (measured 1.2e-6 to 1.6e-6).
"""

import json
import os
import subprocess
import sys

import pytest

import diffusers  # noqa: F401 (a test dependency: the test extra installs it; missing, this file fails)

from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "pipeline_sharding_worker.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_sharding")
    make_hub_pipeline(root, "dev")
    run = subprocess.run([sys.executable, WORKER, str(root)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_strategy_gives_the_single_device_image(facts):
    assert facts["devices"] == 8
    seen = set()
    for case in facts["cases"]:
        seen.add(case["strategy"])
        for batch, (shape, error) in case["errors"].items():
            assert shape[0] == int(batch), case  # padding rows are dropped
            assert error <= 1e-5, (case["strategy"], case["mesh"], batch, error)
    assert seen == {"dp", "fsdp", "tp", "fsdp_tp"}
    for case in facts["cases"]:  # Kontext: reference tokens appended in the sequence, batch 3 padded
        shape, error = case["kontext"]
        assert shape[0] == 3 and error <= 1e-5, (case["strategy"], case["mesh"], "kontext", error)
    # Both a batch that divides the data axes and one that has to be padded were run.
    assert any(int(b) % 8 == 0 for c in facts["cases"] if c["strategy"] == "dp" for b in c["errors"])
    assert any(b == "3" for c in facts["cases"] for b in c["errors"])


def test_img2img_under_every_strategy_gives_the_single_device_image(facts):
    """img2img with an inpainting mask (tests/pipeline_sharding_worker.py IMG2IMG), same limit."""
    assert {c["strategy"] for c in facts["cases"] if c["img2img"]} == {"dp", "fsdp", "tp", "fsdp_tp"}
    for case in facts["cases"]:
        for batch, (shape, error) in case["img2img"].items():
            assert shape[0] == int(batch), case
            assert error <= 1e-5, (case["strategy"], case["mesh"], batch, error)


def _case(facts, strategy, mesh):
    return next(c for c in facts["cases"] if c["strategy"] == strategy and c["mesh"] == mesh)


def test_weights_are_laid_out_as_the_tables_say(facts):
    # qkv kernel (layers, embed, qkv); proj kernel (layers, heads, embed); T5 wi_0 (layers, embed, mlp)
    dp = _case(facts, "dp", {"data": 8})
    for key in ("qkv", "proj", "t5_wi"):
        assert dp[key][1] == [dp[key][0]]  # replicated: every device holds the whole kernel
    fsdp = _case(facts, "fsdp", {"fsdp": 8})
    (layers, embed, qkv), = [fsdp["qkv"][0]]
    assert fsdp["qkv"][1] == [[layers, embed // 8, qkv]]  # 1/8 of the kernel, split on embed
    tp = _case(facts, "tp", {"data": 2, "tensor": 4})
    assert tp["qkv"][1] == [[layers, embed, qkv // 4]]  # column-parallel
    assert tp["proj"][1] == [[layers, tp["proj"][0][1] // 4, embed]]  # row-parallel
    both = _case(facts, "fsdp_tp", {"fsdp": 4, "tensor": 2})
    assert both["qkv"][1] == [[layers, embed // 4, qkv // 2]]
    t5 = both["t5_wi"][0]
    assert both["t5_wi"][1] == [[t5[0], t5[1] // 4, t5[2] // 2]]  # T5 is sharded by the same table
