"""`fluxjax bench tpu`: the TPU compiler's figures for FLUX on TPU topologies, written to docs/tpu.md.

Each case is `fluxjax plan --topology T --sharding S --json --programs denoise` in a child process
(libtpu, the `tpu` extra; no TPU needed): the denoising loop compiled for that topology, its
per-chip memory, whether it fits, the compile seconds, and the planner's analytic figure beside it.
A roofline estimate of ms per step is added: the larger of (analytic FLOPs per chip / the chip's
bf16 peak) and (weight bytes a chip reads per step / its HBM bandwidth). It is an estimate, not a
measurement: no TPU ran anything. maxdiffusion's published step times are printed beside it.

Results are kept in a JSON-lines cache (--cache), so a long matrix can be stopped and resumed; the
table is rewritten from every cached case each time. `--full` runs the matrix of issue 30 (hours
on a 2-core host: hundreds of full-size compiles); the default is a subset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

from fluxjax.bench.fullsize import chip_peak, step_flops

# Published HBM bandwidth per chip, bytes/s (Cloud TPU system architecture pages).
HBM_BANDWIDTH = {"TPU v4": 1228e9, "TPU v5 lite": 819e9, "TPU v5": 2765e9, "TPU v6 lite": 1640e9}
# Users' names for slices -> libtpu's topology names (v5p-8 is 4 chips: 8 TensorCores).
TOPOLOGIES = {"v5e-1": "v5e:1x1", "v6e-1": "v6e:1x1", "v5e-8": "v5e:2x4", "v6e-8": "v6e:2x4", "v5p-8": "v5p:2x2x1",
              "v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4"}
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "sp_ulysses", "sp_ring", "sp_ulysses_fsdp", "sp_ring_fsdp")
SP = ("sp_ulysses", "sp_ring", "sp_ulysses_fsdp", "sp_ring_fsdp")
# maxdiffusion's published figures (its README, read 2026-12-05), for the reader's comparison only.
PUBLISHED = [
    ("maxdiffusion, FLUX.1-dev, v6e-4, dp, batch 4", "196 ms per chip per image"),
    ("maxdiffusion, FLUX.1-dev, v6e-8", "152.84 ms/step"),
]


def full_matrix() -> list[dict]:
    """Issue 30's table: dev and schnell at 1024 and 2048 (4096 with sp), 1 and 4 images per data
    shard, every strategy, on v5e-1, v6e-1, v5e-8, v6e-8, v5p-8, v5e-256 and v5p-128. On one chip
    every strategy is the same one-device program: fsdp stands for them there."""
    cases = []
    for model in ("dev", "schnell"):
        for slice_name, topology in TOPOLOGIES.items():
            one_chip = topology.endswith(":1x1")
            for strategy in ("fsdp",) if one_chip else STRATEGIES:
                for size in (1024, 2048, 4096):
                    if size == 4096 and strategy not in SP:
                        continue
                    for per_shard in (1, 4):
                        cases.append(dict(model=model, slice=slice_name, strategy=strategy, size=size, per_shard=per_shard))
    return cases


def quick_matrix() -> list[dict]:
    """The subset this repo's docs/tpu.md shows: dev, one image per data shard; every 2D strategy
    on the 8-chip slices, fsdp on one chip of each kind, sequence parallelism at 2048 and 4096."""
    cases = [dict(model="dev", slice=s, strategy="fsdp", size=1024, per_shard=1) for s in ("v5e-1", "v6e-1")]
    for slice_name in ("v5e-8", "v6e-8", "v5p-8"):
        for strategy in ("dp", "fsdp", "tp", "fsdp_tp"):
            cases.append(dict(model="dev", slice=slice_name, strategy=strategy, size=1024, per_shard=1))
    for size in (2048, 4096):
        for strategy in ("sp_ulysses", "sp_ring"):
            cases.append(dict(model="dev", slice="v6e-8", strategy=strategy, size=size, per_shard=1))
    cases.append(dict(model="schnell", slice="v5e-8", strategy="fsdp", size=1024, per_shard=4))
    return cases


def key(case: dict) -> str:
    return "{model} {slice} {strategy} {size} {per_shard}".format(**case)


def run_case(case: dict, python: str, timeout: int) -> dict:
    """One case in a child process (`fluxjax plan --topology ... --json`); the JSON, or an error."""
    from types import SimpleNamespace

    from fluxjax.parallel.strategies import Strategy

    topology = TOPOLOGIES[case["slice"]]
    strategy = Strategy.load(case["strategy"])
    chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
    batch = case["per_shard"] * strategy.data_size(SimpleNamespace(shape=strategy.mesh_shape(chips)))
    argv = ["plan", "--model", case["model"], "--sharding", case["strategy"], "--topology", topology,
            "--size", f"{case['size']}x{case['size']}", "--batch", str(batch), "--programs", "denoise", "--json"]
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, "-c", "import sys; from fluxjax.commands.cli import main; sys.exit(main())", *argv],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(case, error=f"no answer in {timeout} s")
    if proc.returncode:
        return dict(case, error=(proc.stderr.strip().splitlines() or ["?"])[-1][:300])
    return dict(case, report=json.loads(proc.stdout), wall_s=time.perf_counter() - start, commit=_commit())


def _commit() -> str:
    """The commit of the fluxjax source that runs (a row of the table says which it came from)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def roofline_ms(row: dict) -> float | None:
    """max(FLOPs per chip / bf16 peak, weight bytes read per chip / HBM bandwidth), ms per step: a
    lower bound of the step time on that chip (labelled an estimate wherever it is shown)."""
    from fluxjax.plan.planner import TEXT_LENGTHS, abstract_params, param_memory, transformer_config
    from fluxjax.parallel.strategies import Strategy

    report = row["report"]
    peak, bandwidth = chip_peak(report["device_kind"]), HBM_BANDWIDTH.get(report["device_kind"])
    if peak is None or bandwidth is None:
        return None
    tokens = (row["size"] // 16) ** 2
    flops = step_flops(transformer_config(row["model"]), report["batch"], tokens, TEXT_LENGTHS[row["model"]])
    # Every chip reads the weights it multiplies with: all of them under dp/fsdp/sp (gathered or
    # whole), its tensor share under tp.
    total = param_memory(abstract_params(row["model"], report["dtype"])["transformer"], Strategy.load(report["strategy"]),
                         report["mesh"]).total_bytes
    weights = total / report["mesh"].get("tensor", 1)
    return 1e3 * max(flops / report["devices"] / peak, weights / bandwidth)


def analytic_bytes(row: dict) -> int:
    """The planner's per-chip figure for a row's case as the planner stands now (parameters of the
    transformer + `make_plan`'s analytic step, with the attention the compiled program held), so the
    table compares the current planner with each compile, whenever that compile ran."""
    from fluxjax.plan.planner import make_plan
    from fluxjax.parallel.strategies import Strategy

    r = row["report"]
    plan = make_plan(row["model"], Strategy.load(row["strategy"]), r["devices"], row["size"], row["size"], r["batch"],
                     r["dtype"], xla=False, attention=r.get("attention", "splash"), device_kind=r["device_kind"])
    return plan.params["transformer"].device_bytes + plan.analytic_bytes


def _row_line(row: dict) -> str:
    gib = lambda n: "?" if n is None else f"{n / 2**30:.2f}"  # noqa: E731
    head = f"| {row['model']} | {row['slice']} | {row['strategy']} | {row['size']} |"
    if "error" in row:
        return f"{head} {row['per_shard']}/shard | error: {row['error']} | | | | | {row.get('commit', '?')} |"
    r = row["report"]
    c = r["compiled"]
    used = c["total_bytes"] if c["total_bytes"] is not None else c["temp_bytes"]
    split = "" if c["argument_bytes"] is None else f" ({gib(c['argument_bytes'])} + {gib(c['temp_bytes'])})"
    state = "yes" if c["fits"] else f"no (HBM {gib(c['hbm_bytes'])})"
    ms = roofline_ms(row)
    analytic = analytic_bytes(row)
    off = f" ({analytic / used - 1:+.0%})" if c["total_bytes"] is not None else ""
    return (f"{head} {r['batch']} | {gib(used)}{split}{' temps alone' if c['total_bytes'] is None else ''} | "
            f"{gib(analytic)}{off} | {state} | {c['compile_s']:.0f} | {'?' if ms is None else f'{ms:.0f}'} | "
            f"{row.get('commit', '?')} |")


def missing_lines(cases: list[dict], done: dict) -> list[str]:
    """The matrix cases not compiled yet, one line per model and slice: `strategy size xPER_SHARD`."""
    groups: dict[tuple[str, str], list[str]] = {}
    for case in cases:
        if key(case) not in done:
            groups.setdefault((case["model"], case["slice"]), []).append(
                f"{case['strategy']} {case['size']} x{case['per_shard']}")
    return [f"- {model} {slice_name} ({len(items)}): {', '.join(items)}" for (model, slice_name), items in groups.items()]


BEGIN, END = "<!-- fluxjax bench tpu: begin -->", "<!-- fluxjax bench tpu: end -->"


def format_table(rows: list[dict], commit: str, host: str, missing: list[str], total: int, cache: str) -> str:
    """The generated part of docs/tpu.md (between BEGIN and END): the table of every cached case
    and the matrix cases not compiled yet."""
    lines = [
        BEGIN,
        f"Table written {datetime.date.today().isoformat()} at commit {commit} on {host}, from `{cache}` (one JSON",
        "line per compiled case); each row names the commit it was compiled at. The analytic column is the",
        "planner at the table's commit (`make_plan` with the attention the compiled program held), and in",
        "brackets how far it is from the compiled figure.",
        "",
        "| model | slice | strategy | size | images | compiled GiB/chip (args + temps) | analytic GiB/chip | fits | "
        "compile s | roofline ms/step (estimate) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = lambda r: (r["model"], list(TOPOLOGIES).index(r["slice"]), r["size"],  # noqa: E731
                       STRATEGIES.index(r["strategy"]), r["per_shard"])
    lines += [_row_line(row) for row in sorted(rows, key=order)]
    lines += ["", f"{len(rows)} of the {total} cases of `--full` are compiled; the rest, per model and slice "
              "(strategy, size, images per data shard):", ""] + (missing or ["- none"])
    lines += ["", "Published figures of a peer, for comparison (not measured here):", ""]
    lines += [f"- {what}: {figure}" for what, figure in PUBLISHED]
    return "\n".join(lines + [END]) + "\n"


def write_table(path: str, generated: str) -> None:
    """Put `generated` between the BEGIN and END markers of `path` (the text around them is the
    docs' own); a file without them gets the generated part appended."""
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + generated + text[text.index(END) + len(END) + 1:]
    else:
        text += generated
    with open(path, "w") as f:
        f.write(text)


def parse_case(text: str) -> dict:
    """'dev v5e-256 fsdp 1024 4' (model slice strategy size images-per-data-shard) -> a case."""
    from fluxjax.errors import UsageError

    parts = text.split()
    if (len(parts) != 5 or parts[0] not in ("dev", "schnell") or parts[1] not in TOPOLOGIES
            or parts[2] not in STRATEGIES or not parts[3].isdigit() or not parts[4].isdigit()):
        raise UsageError(f"--case {text!r}: expected 'MODEL SLICE STRATEGY SIZE PER_SHARD', e.g. 'dev v5e-8 fsdp 1024 1' "
                         f"(slices: {', '.join(TOPOLOGIES)}; strategies: {', '.join(STRATEGIES)})")
    return dict(model=parts[0], slice=parts[1], strategy=parts[2], size=int(parts[3]), per_shard=int(parts[4]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fluxjax bench tpu", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="issue 30's whole matrix (hours on a small host)")
    parser.add_argument("--case", action="append", default=[], metavar="'MODEL SLICE STRATEGY SIZE PER_SHARD'",
                        help="compile this case (again, if cached) and nothing else; repeatable")
    parser.add_argument("--cache", default=os.path.join("docs", "tpu.jsonl"),
                        help="JSON lines of compiled cases, appended to as each finishes (resumable; the last line of a case wins)")
    parser.add_argument("--out", default=os.path.join("docs", "tpu.md"), help="the markdown file whose table to rewrite")
    parser.add_argument("--python", default=sys.executable, help="the Python with libtpu to compile in")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one case may take")
    args = parser.parse_args(argv)
    asked = [parse_case(c) for c in args.case]
    matrix = full_matrix()
    done = {}
    if os.path.exists(args.cache):
        with open(args.cache) as f:
            for line in f:
                row = json.loads(line)
                done[key(row)] = row
    todo = asked or [c for c in (matrix if args.full else quick_matrix()) if key(c) not in done]
    for i, case in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {key(case)} ...", flush=True)
        row = run_case(case, args.python, args.timeout)
        done[key(case)] = row
        with open(args.cache, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("   ", row.get("error") or f"{row['report']['compiled']['compile_s']:.0f} s", flush=True)
    listed = {key(c) for c in matrix}
    rows = [row for k, row in done.items() if k in listed or "error" not in row]
    host = f"{os.cpu_count()} CPU cores ({sys.platform})"
    write_table(args.out, format_table(rows, _commit(), host, missing_lines(matrix, done), len(matrix), args.cache))
    print(f"wrote {args.out}: {len(rows)} cases; {sum(key(c) not in done for c in matrix)} of the {len(matrix)} of --full to go")


if __name__ == "__main__":
    main()
