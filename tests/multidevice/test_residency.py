"""The text encoders on the host CPU (fluxjax/pipeline/residency.py) beside a pipeline on a mesh of 4
of the 8 simulated CPU devices: chosen by "auto" where the device memory (monkeypatched) is too small,
said in one line, their parameters off the mesh. (The pixels, equal to those of the pipeline with
every component on the mesh: tests/multidevice/test_sharded_quantize.py, which has that pipeline's
programs compiled already.)"""

import warnings

import jax
import pytest

from fluxjax.errors import UsageError
from fluxjax.loading.checkpoint import flat
from fluxjax.pipeline import residency
from fluxjax.pipeline.pipeline import FluxPipeline


def devices_of(tree) -> set:
    return set().union(*(leaf.devices() for leaf in flat(tree).values()))


def test_auto_moves_the_encoders_to_the_host_where_they_do_not_fit(monkeypatch):
    mesh_devices = jax.devices()[4:]  # the host's CPU device (jax.devices("cpu")[0]) stays off the mesh
    assert residency.memory_limit(mesh_devices[0]) is None  # the CPU tells none: "auto" keeps all on the devices
    assert residency.decide("auto", {"transformer": 10, "t5": 10}, None) == ("device", None)
    # the limit against every component's parameters and an eighth of it for temporaries
    assert residency.decide("auto", {"transformer": 60, "t5": 10}, 80)[0] == "device"
    assert residency.decide("auto", {"transformer": 61, "t5": 10}, 80)[0] == "host"
    assert residency.decide("device", {"transformer": 61, "t5": 10}, 80) == ("device", None)
    # The tiny components per device on this mesh: 5,682,540 bytes (the VAE's 5,085,708 replicated),
    # and an eighth of 6 MiB for temporaries: more than 6 MiB.
    limit = 6 << 20
    monkeypatch.setattr(residency, "memory_limit", lambda device: limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = FluxPipeline.from_pretrained("tiny", dtype="float32", sharding="fsdp", devices=mesh_devices)
    lines = [str(w.message) for w in caught if issubclass(w.category, residency.ResidencyWarning)]
    assert len(lines) == 1 and lines[0].startswith("text encoders run on the host CPU: transformer "), lines
    assert "\n" not in lines[0] and "of device memory" in lines[0]
    assert pipe.residency == "host"
    host = jax.devices("cpu")[0]
    for name in ("t5", "clip"):
        assert devices_of(getattr(pipe, name).params) == {host}, name
    for name in ("transformer", "vae"):
        assert devices_of(getattr(pipe, name).params) == set(mesh_devices), name


def test_residency_is_checked_in_one_line(capsys):
    from fluxjax.commands.cli import main

    with pytest.raises(UsageError, match=r"^residency='gpu': choose auto"):
        FluxPipeline.from_pretrained("tiny", residency="gpu")
    for command in (["generate", "x"], ["edit", "x.png", "--source-prompt", "a", "--target-prompt", "b"],
                    ["batch", "p.txt", "--out-dir", "o"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--residency", "gpu"])
        assert e.value.code == 2 and "--residency: invalid choice: 'gpu'" in capsys.readouterr().err
