"""`fluxjax batch`: files and metadata, batching, restart, interruption, bad input, two processes.

In-process runs share one tiny pipeline (FluxPipeline.from_pretrained is patched to return it), so
each batch shape compiles once for the whole file. All images are 32x32, 1 step.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fluxjax.batch import runner as batch
from fluxjax.commands import cli
from fluxjax.pipeline.pipeline import FluxPipeline

import processes

SIZE = ["--model", "tiny", "--height", "32", "--width", "32", "--steps", "1"]
PROMPTS = [f"prompt number {k}" for k in range(10)]


@pytest.fixture(scope="module")
def tiny():
    return FluxPipeline.from_pretrained("tiny")


@pytest.fixture
def calls(tiny, monkeypatch):
    """The pipeline every in-process run gets; returns the list of (batch size, height, width, steps) of its calls."""
    log = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tiny, name)

        def __call__(self, prompts, **kw):
            log.append((len(prompts), kw["height"], kw["width"], kw["num_steps"]))
            return tiny(prompts, **kw)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: Spy()))
    return log


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def pixels(folder, names):
    return {n: np.asarray(Image.open(os.path.join(folder, n))) for n in names}


def records(folder):
    """All manifest lines of all hosts: [(host file, record)]."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("manifest-"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out += [(name, json.loads(line)) for line in f]
    return out


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """PROMPTS as a single uninterrupted run makes them (batch size 1): name -> uint8 pixels."""
    folder = tmp_path_factory.mktemp("reference")
    jobs = batch.resolve(batch.read_jobs(write(folder / "p.txt", PROMPTS), height=32, width=32, steps=1), tiny)
    out = folder / "out"
    out.mkdir()
    summary = batch.generate(tiny, jobs, str(out), batch_size=1)
    assert summary.done == 10 and summary.failed == 0
    return pixels(out, [f"{k:06d}.png" for k in range(10)])


def test_text_file_batched_with_padding(tmp_path, calls, capsys, tiny, reference):
    prompts = write(tmp_path / "p.txt", ["a red cube", "", "  a blue sphere ", "a green cone"])
    out = tmp_path / "out"
    assert cli.main(["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2", "--seed", "7"]) == 0
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "manifest-00000.jsonl"]
    assert calls == [(2, 32, 32, 1), (2, 32, 32, 1)]  # the last batch padded to 2: one compiled shape
    for k, prompt in enumerate(["a red cube", "a blue sphere", "a green cone"]):
        image = Image.open(out / f"{k:06d}.png")
        assert image.size == (32, 32)
        assert image.text == {"prompt": prompt, "seed": str(7 + k), "steps": "1", "guidance": "3.5", "size": "32x32",
                              "model": "tiny", "software": "fluxjax"}
    # the image of job 2 (alone in its padded batch) is the one a direct call gives for its seed
    (direct,) = tiny("a green cone", height=32, width=32, num_steps=1, seed=9, output="pil")
    assert np.array_equal(np.asarray(Image.open(out / "000002.png")), np.asarray(direct))
    assert [r["name"] for _, r in records(out)] == ["000000.png", "000001.png", "000002.png"]
    assert "3 done, 0 skipped as already done, 0 failed" in capsys.readouterr().err


def test_jsonl_names_seeds_and_shapes(tmp_path, calls):
    lines = [{"prompt": "a", "name": "first"}, {"prompt": "b", "seed": 123, "height": 48},
             {"prompt": "c", "steps": 2, "guidance": 5}, {"prompt": "d", "name": "last.png"}]
    prompts = write(tmp_path / "p.jsonl", [json.dumps(x) for x in lines])
    out = tmp_path / "out"
    assert cli.main(["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2", "--seed", "100"]) == 0
    texts = {n: Image.open(out / n).text for n in ("first.png", "000001.png", "000002.png", "last.png")}
    assert [(t["seed"], t["size"], t["steps"], t["guidance"]) for t in texts.values()] == [
        ("100", "32x32", "1", "3.5"), ("123", "32x48", "1", "3.5"), ("102", "32x32", "2", "5"), ("103", "32x32", "1", "3.5")]
    assert Image.open(out / "000001.png").size == (32, 48)
    # grouped by shape: "a" and "d" share a batch; the others are alone in theirs
    assert sorted(calls) == [(2, 32, 32, 1), (2, 32, 32, 2), (2, 48, 32, 1)]


def test_restart_skips_done_images_and_writes_nothing(tmp_path, calls, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2"]
    assert cli.main(args) == 0
    before = {n: os.stat(out / n) for n in os.listdir(out)}
    calls.clear()
    assert cli.main(args) == 0
    assert calls == []
    after = {n: os.stat(out / n) for n in os.listdir(out)}
    assert {n: (s.st_ino, s.st_mtime_ns, s.st_size) for n, s in after.items()} == \
           {n: (s.st_ino, s.st_mtime_ns, s.st_size) for n, s in before.items()}
    assert "0 done, 3 skipped as already done, 0 failed" in capsys.readouterr().err
    # another recipe under the same names is refused, not overwritten
    assert cli.main([*args, "--seed", "1"]) == 2
    assert "p.txt:1: 000000.png is already recorded in the output folder with another seed" in capsys.readouterr().err


def run_interrupted(monkeypatch, args, k):
    """Run `fluxjax batch` with save_png raising KeyboardInterrupt (as a kill would stop it) on its (k+1)-th call."""
    saved = []
    original = batch.save_png

    def save(image, path, text):
        if len(saved) == k:
            raise KeyboardInterrupt
        original(image, path, text)
        saved.append(path)

    monkeypatch.setattr(batch, "save_png", save)
    assert cli.main(args) == 130
    monkeypatch.setattr(batch, "save_png", original)


def test_interrupted_run_resumes_to_the_uninterrupted_images(tmp_path, calls, monkeypatch, capsys, reference):
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2"]
    run_interrupted(monkeypatch, args, 5)
    # images 0-3 recorded; 4 renamed into place but stopped before its manifest line
    assert sorted(os.listdir(out)) == [f"{k:06d}.png" for k in range(5)] + ["manifest-00000.jsonl"]
    assert [r["name"] for _, r in records(out)] == [f"{k:06d}.png" for k in range(4)]
    with open(out / "manifest-00000.jsonl", "a") as f:
        f.write('{"name": "000004.png", "ind')  # and a line cut short by the kill
    calls.clear()
    assert cli.main(args) == 0
    assert sum(n for n, *_ in calls) == 6  # images 4-9, in 3 batches of 2
    assert "6 done (1 found unrecorded and made again), 4 skipped as already done, 0 failed" in capsys.readouterr().err
    names = [r["name"] for _, r in records(out)]
    assert sorted(names) == sorted(reference) and len(names) == 10
    assert sorted(os.listdir(out)) == sorted(reference) + ["manifest-00000.jsonl"]
    got = pixels(out, reference)
    assert all(np.array_equal(got[n], reference[n]) for n in reference)


def test_failed_batch_is_counted_and_retried(tmp_path, calls, monkeypatch, capsys):
    prompts = write(tmp_path / "p.txt", PROMPTS[:4])
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2"]
    original = batch.save_png

    def save(image, path, text):
        if path.endswith("000000.png"):
            raise OSError(28, "No space left on device")
        original(image, path, text)

    monkeypatch.setattr(batch, "save_png", save)
    assert cli.main(args) == 1  # the run goes on after a failed batch, and says so in its exit code
    err = capsys.readouterr().err
    assert "2 images failed (000000.png ...): OSError" in err and "2 done, 0 skipped as already done, 2 failed" in err
    assert [r["name"] for _, r in records(out)] == ["000002.png", "000003.png"]
    monkeypatch.setattr(batch, "save_png", original)
    assert cli.main(args) == 0
    assert "2 done, 2 skipped as already done, 0 failed" in capsys.readouterr().err


@pytest.mark.parametrize("name, lines, message", [
    ("p.jsonl", ['{"prompt": "a"}', '{"prompt": "b",}'], "p.jsonl:2: not valid JSON"),
    ("p.jsonl", ['{"prompt": "a"}', "", '{"seed": 3}'], "p.jsonl:3: missing \"prompt\""),
    ("p.jsonl", ['{"prompt": "a", "height": 40}'], "p.jsonl:1: height 40 is not a multiple of 16; use 32 or 48"),
    ("p.jsonl", ['{"prompt": "a", "name": "x"}', '{"prompt": "b", "name": "x.png"}'],
     "p.jsonl:2: name x.png is already used by"),
    ("p.jsonl", ['{"prompt": "a"}', '{"prompt": "b", "name": "000000"}'], "p.jsonl:2: name 000000.png is already used by"),
    ("p.jsonl", ['{"prompt": "a", "seeds": 3}'], "p.jsonl:1: unknown key 'seeds'"),
    ("p.jsonl", ['{"prompt": "a", "name": "../x"}'], "p.jsonl:1: name must be a plain file name"),
    ("p.jsonl", ['{"prompt": "a", "steps": 0}'], "p.jsonl:1: steps must be at least 1"),
    ("p.txt", ["", "  "], "p.txt: no prompts in the file"),
])
def test_bad_prompts_file_exits_2_naming_file_and_line(tmp_path, capsys, name, lines, message):
    prompts = write(tmp_path / name, lines)
    out = tmp_path / "out"
    assert cli.main(["batch", prompts, "--out-dir", str(out), *SIZE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluxjax batch: error: ") and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_share_the_work_and_finish_an_interrupted_run(tmp_path, calls, monkeypatch, reference):
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2"]
    run_interrupted(monkeypatch, args, 3)  # a one-process run killed after 3 images: 0-1 recorded, 2 not
    before = len(records(out))

    results = processes.finish(processes.start_processes(args, 2, processes.base_env(devices=4)), timeout=300)
    assert "host 0 of 2: 4 done (1 found unrecorded and made again), 1 skipped" in results[0][1]  # 2, 4, 6, 8
    assert "host 1 of 2: 4 done, 1 skipped" in results[1][1]  # 3, 5, 7, 9

    recs = records(out)
    names = [r["name"] for _, r in recs]
    assert len(names) == 10 and sorted(names) == sorted(reference)  # every image recorded exactly once
    assert all(r["index"] % 2 == 1 and r["host"] == 1 for f, r in recs if f == "manifest-00001.jsonl")
    assert all(r["index"] % 2 == 0 for f, r in recs[before:] if f == "manifest-00000.jsonl")
    assert sorted(os.listdir(out)) == sorted(reference) + ["manifest-00000.jsonl", "manifest-00001.jsonl"]
    got = pixels(out, reference)
    assert all(np.array_equal(got[n], reference[n]) for n in reference)


@pytest.mark.parametrize("env, message", [
    ({"FLUXJAX_PROCESS_ID": "0"}, "FLUXJAX_COORDINATOR is set, so FLUXJAX_NUM_PROCESSES must be set too"),
    ({"FLUXJAX_NUM_PROCESSES": "two", "FLUXJAX_PROCESS_ID": "0"}, "FLUXJAX_NUM_PROCESSES='two' is not an integer"),
    ({"FLUXJAX_NUM_PROCESSES": "2", "FLUXJAX_PROCESS_ID": "2"}, "FLUXJAX_PROCESS_ID=2 must be below FLUXJAX_NUM_PROCESSES=2"),
])
def test_distributed_settings_are_checked(monkeypatch, env, message):
    from fluxjax.parallel import distributed

    for name in ("FLUXJAX_NUM_PROCESSES", "FLUXJAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLUXJAX_COORDINATOR", "localhost:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.initialize()


def one_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxjax batch: error: "), lines
    return lines[0][len("fluxjax batch: error: "):]


@pytest.mark.parametrize("name, content, args, message", [
    ("p.txt", "a cat\ncaf\xe9 au lait\n".encode("latin-1"), [],
     "p.txt:2: not valid UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8"),  # item 9
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "\\udce9"}\n', [], "p.jsonl:2: prompt is not valid UTF-8 text (byte 0xe9 at character 1)"),
    ("p.jsonl", b'{"prompt": "a", "seed": 4294967296}\n', [],
     "p.jsonl:1: seed must be an integer from 0 to 4294967295, got 4294967296"),  # item 10
    ("p.txt", b"a\nb\n", ["--seed", "4294967295"], "p.txt:2: seed must be an integer from 0 to 4294967295, got 4294967296"),
    ("p.txt", b"a\n", ["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
    ("p.jsonl", b'{"prompt": "a", "guidance": NaN}\n', [], "p.jsonl:1: guidance must be a finite number, got nan"),  # item 13
    ("p.txt", b"a\n", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
])
def test_bad_input_is_one_line_with_file_and_line(tmp_path, capsys, monkeypatch, name, content, args, message):
    """Issue 14 items 9, 10, 13: refused before loading, exit 2, nothing written."""
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    try:
        code = cli.main(["batch", str(tmp_path / name), "--out-dir", str(out), *SIZE, *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and one_line(capsys) == message.replace("p.", f"{tmp_path}/p.", 1 if message.startswith("p.") else 0)
    assert sorted(os.listdir(tmp_path)) == [name]


def test_size_beyond_memory_is_refused_naming_the_line(tmp_path, capsys, monkeypatch):
    """Issue 14 item 8: the first line asking for a size the devices cannot hold, before loading."""
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    prompts = write(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "b", "height": 99984, "width": 99984}'])
    assert cli.main(["batch", prompts, "--out-dir", str(tmp_path / "out"), *SIZE]) == 2
    message = one_line(capsys)
    assert message.startswith(f"{prompts}:2: size 99984x99984: one denoising step needs ") and \
        "the largest image this model can make here has" in message
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]


def test_resume_with_another_batch_size_is_refused(tmp_path, calls, capsys):
    """Issue 14 item 6: pixels depend on the compiled batch size (README), so a folder keeps one."""
    prompts = write(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE]
    assert cli.main([*args, "--batch-size", "2"]) == 0
    recs = records(out)
    assert all(r["batch_size"] == "2" and r["dtype"] == "bfloat16" and r["sharding"] == "none" and
               r["devices"] == "1 x cpu" for _, r in recs)
    (out / "000002.png").unlink()
    (out / "manifest-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for _, r in recs[:2]))
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    assert cli.main([*args, "--batch-size", "1"]) == 2
    assert one_line(capsys) == ("000000.png in the output folder was made with batch_size '2', this run's is '1'; an "
                                "image's pixels depend on it, so resume with the same settings or use a new --out-dir")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert cli.main([*args, "--batch-size", "2"]) == 0  # the same settings resume
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "manifest-00000.jsonl"]


def test_nan_output_is_a_failed_image_not_a_done_one(tmp_path, monkeypatch, capsys, tiny):
    """Issue 14 item 13: NaN weights give NaN images: counted failed, nothing written or recorded."""
    import copy

    import jax

    from fluxjax.pipeline.pipeline import Component

    poisoned = copy.copy(tiny)
    poisoned.vae = Component(tiny.vae.model, jax.tree.map(lambda x: x * np.nan, tiny.vae.params))
    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: poisoned))
    prompts = write(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "out"
    assert cli.main(["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert ("2 images failed (000000.png ...): NonFiniteError: images 0, 1 of the batch came out with NaN or infinite "
            "values (non-finite weights or inputs); nothing is written for them") in err
    assert "0 done, 0 skipped as already done, 2 failed" in err
    assert os.listdir(out) == ["manifest-00000.jsonl"] and records(out) == []


BATCH_KILL_SCRIPT = """
import os, signal, sys
import fluxjax.batch.runner as batch
from fluxjax.commands.cli import main
from fluxjax.images import temporary_path

save, saved = batch.save_png, []
def save_then_die(image, path, text):  # a SIGKILL in the middle of writing the 4th PNG
    if len(saved) == 3:
        with open(temporary_path(path), "wb") as f:
            f.write(b"\\x89PNG\\r\\n")
        os.kill(os.getpid(), signal.SIGKILL)
    save(image, path, text)
    saved.append(path)

batch.save_png = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_uninterrupted_images(tmp_path, calls, capsys, reference):
    """A real SIGKILL (not an exception) while a PNG is being written: no partial PNG, and the
    next run removes the temporary file, says so, and finishes with the uninterrupted images."""
    prompts = write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    args = ["batch", prompts, "--out-dir", str(out), *SIZE, "--batch-size", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FLUXJAX_COMPILATION_CACHE": "off", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", BATCH_KILL_SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert re.fullmatch(r"\.000003\.png\.\d+\.tmp", names[0])  # the unfinished 4th PNG, under its temporary name
    assert names[1:] == ["000000.png", "000001.png", "000002.png", "manifest-00000.jsonl"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"removed 1 unfinished PNG temporary file(s) left by an interrupted run: {out / names[0]}" in err
    assert "7 done, 3 skipped as already done, 0 failed" in err
    assert sorted(os.listdir(out)) == sorted(reference) + ["manifest-00000.jsonl"]
    got = pixels(out, reference)
    assert all(np.array_equal(got[n], reference[n]) for n in reference)


@pytest.mark.parametrize("line", [{"prompt": "a cat", "image": "ok.png"},  # N151
                                  {"image": "ok.png", "source_prompt": "a", "target_prompt": "b"}])  # N150
def test_decompression_bomb_line_is_refused_before_loading(tmp_path, capsys, monkeypatch, line):
    import bad_images

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", bad_images.BOMB_LIMIT)
    files = bad_images.make(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(line) + "\n")
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["batch", str(jobs), "--out-dir", str(tmp_path / "out"), "--model", "tiny"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fluxjax batch: error: {jobs}:1: image {files['ok']}: unreadable image (DecompressionBombError: Image size "
        "(1536 pixels) exceeds limit of 1000 pixels, could be decompression bomb DOS attack.)"]
    assert sorted(os.listdir(tmp_path)) == before


def test_kontext_lines_make_their_size_and_count_references_in_the_limit(tmp_path, capsys, monkeypatch):
    """N35, N46 in batch: a line with references makes its own size (or diffusers' default), and
    its references' tokens count in the size limit (an 8 GiB device, so this machine's RAM does not matter)."""
    from fluxjax.plan import limits
    from fluxjax.pipeline.pipeline import DEFAULTS

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    monkeypatch.setattr(limits, "device_memory", lambda device: (8 << 30, "this host's RAM"))
    Image.new("RGB", (16, 16)).save(tmp_path / "ref.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a", "references": ["ref.png"], "height": 64, "width": 96}) + "\n"
                    + json.dumps({"prompt": "b", "references": ["ref.png"]}) + "\n")
    assert [batch.job_size(j, DEFAULTS["tiny"]) for j in batch.read_jobs(str(jobs))] == [(64, 96), (1024, 1024)]
    jobs.write_text(json.dumps({"prompt": "a", "references": ["ref.png"] * 40, "height": 64, "width": 64}) + "\n")
    assert cli.main(["batch", str(jobs), "--out-dir", str(tmp_path / "out"), "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"fluxjax batch: error: {jobs}:1: size 64x64 with 40 reference image(s) (163,840 tokens): one denoising step needs ")
    assert sorted(os.listdir(tmp_path)) == ["jobs.jsonl", "ref.png"]


@pytest.mark.parametrize("name, message", [
    ("a\u0000b", ":1: name 'a\\x00b' holds a NUL character, which no file name can"),  # N157
    ("x" * 300, ":1: name is 304 bytes long as a file name (xxxxxxxxxxxxxxxxxxxx...); the most is 242 "
                "(255 less the temporary name's .NAME.PID.tmp)"),  # N158
    ("é" * 120, ":1: name is 244 bytes long as a file name (éééééééééééééééééééé...); the most is 242 "
                "(255 less the temporary name's .NAME.PID.tmp)"),  # bytes, not characters
])
def test_names_no_file_can_have_are_refused_up_front(tmp_path, capsys, name, message):
    """N157, N158: refused with the file's other checks, not after the compute."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "name": name}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["batch", str(prompts), "--out-dir", str(out), *SIZE]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fluxjax batch: error: {prompts}{message}"]
    assert not out.exists()
    # The longest name allowed: its temporary .NAME.PID.tmp is 255 bytes with a 7-digit pid.
    prompts.write_text(json.dumps({"prompt": "a", "name": "x" * 238}) + "\n")
    assert [j.name for j in batch.read_jobs(str(prompts))] == ["x" * 238 + ".png"]
