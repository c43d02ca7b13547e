"""Sequence parallelism (models/sequence_parallel.py; strategies sp_ulysses, sp_ring and their
fsdp combinations) on 8 simulated CPU devices gives the single-device results.

The work runs in tests/sequence_parallel_worker.py (a subprocess: the device count is fixed
when jax is imported) on a hub-layout fixture with an 8-head transformer saved here, so Ulysses
runs at degrees 2, 4 and 8. Limits: the transformer within 1e-5 of one device relative to its
largest output (fp32, the issue's bound), the pipeline's pixels within 1e-5 as for every other
strategy (tests/test_pipeline_sharding.py).
"""

import json
import os
import subprocess
import sys

import pytest

import diffusers  # noqa: F401 (a test dependency: the test extra installs it; missing, this file fails)

from fluxjax.testing.reference import make_hub_pipeline  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "sequence_parallel_worker.py")
LENGTH, HEADS, BATCH, HEAD_DIM = 40, 8, 2, 16  # the worker's compiled attention


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_sp")
    make_hub_pipeline(root, "dev", num_attention_heads=HEADS)
    run = subprocess.run([sys.executable, WORKER, str(root)], capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _cases(facts, key):
    return {(c["strategy"], tuple(c["mesh"].values())): c for c in facts[key]}


def test_the_transformer_matches_one_device(facts):
    assert facts["devices"] == 8
    cases = _cases(facts, "transformer")
    want = {(f"sp_{m}", (1, n)) for m in ("ring", "ulysses") for n in (2, 4, 8)}
    want |= {(f"sp_{m}_fsdp", mesh) for m in ("ring", "ulysses") for mesh in ((4, 2), (2, 4))}
    assert set(cases) == want
    for key, case in cases.items():
        assert set(case["errors"]) == {"divides", "pads"}, key  # 32 and 29 tokens
        for tokens, error in case["errors"].items():
            assert error <= 1e-5, (key, tokens, error)


def test_the_pipeline_gives_the_single_device_image(facts):
    cases = _cases(facts, "pipeline")
    want = {(f"sp_{m}", (1, n)) for m in ("ring", "ulysses") for n in (2, 4, 8)}
    assert set(cases) == want | {(f"sp_{m}_fsdp", (4, 2)) for m in ("ring", "ulysses")}
    for m in ("ring", "ulysses"):
        # 16 text tokens + 16 image tokens (64x64) divide every degree; + 15 (48x80) none.
        assert set(cases[f"sp_{m}", (1, 8)]["errors"]) == {"divides", "pads"}
    for (name, mesh), case in cases.items():
        assert case["errors"], (name, mesh)
        for size, error in case["errors"].items():
            assert error <= 1e-5, (name, mesh, size, error)


def test_ring_never_holds_the_whole_sequence_of_keys(facts):
    """Compiled per device: collective-permutes only, and no array with a whole-sequence axis."""
    for case in facts["hlo"]:
        if case["strategy"] != "sp_ring":
            continue
        n = case["degree"]
        assert case["collectives"] == ["collective-permute"], case["collectives"]
        assert not [s for s in case["shapes"] if LENGTH in s], case
        assert any(LENGTH // n in s and HEAD_DIM in s for s in case["shapes"])  # the blocks are there


def test_ulysses_adds_only_all_to_alls(facts):
    """Compiled per device: all-to-alls only, at least one per tensor swapped (q, k, v, out)."""
    for case in facts["hlo"]:
        if case["strategy"] != "sp_ulysses":
            continue
        assert case["collectives"] == ["all-to-all"], case["collectives"]
        assert case["count"] >= 1
        # after the swap a device holds the whole sequence of its H/n heads
        assert any(LENGTH in s and HEADS // case["degree"] in s for s in case["shapes"]), case


def test_splash_under_ring_and_ulysses_equals_xla_attention_with_its_gradients(facts):
    # The TPU path on a CPU (Pallas interpret mode): Ulysses runs splash per device on its heads;
    # the ring runs each key block through splash and folds the blocks by logsumexp, its gradient
    # through the ring's own XLA fold (a custom VJP). Output and dq, dk, dv within 1e-5 of XLA's
    # attention on one device, relative to the largest (the transformer's bound above).
    cases = {(c["strategy"], c["degree"]): c["errors"] for c in facts["splash"]}
    assert set(cases) == {("sp_ring", 2), ("sp_ring", 4), ("sp_ulysses", 2)}
    for key, errors in cases.items():
        assert set(errors) == {"out", "dq", "dk", "dv"}
        assert max(errors.values()) <= 1e-5, (key, errors)
