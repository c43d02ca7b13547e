"""`fluxjax bench [NAME] [--quick] [--json FILE] [options]`: the benchmarks of fluxjax/bench/, each
against the PyTorch reference in the same run, then one table of every figure (and JSON)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

BENCHMARKS = ("transformer", "t5", "vae", "pipeline", "convert", "fullsize", "endtoend", "lora", "shapes", "quantization")
# Run only when named: `tpu` compiles full-size programs for TPU topologies (libtpu) and rewrites docs/tpu.md.
BY_NAME = ("tpu",)

# Small configs for `--quick`: every section in a few minutes on a 2-core CPU.
QUICK = {
    "transformer": ["--hidden", "256", "--heads", "4", "--img-tokens", "256", "--txt-tokens", "64", "--repeat", "3"],
    "t5": ["--d-model", "256", "--heads", "4", "--layers", "4", "--d-ff", "512", "--length", "128", "--repeat", "3",
           "--attn", "sdpa"],
    "vae": ["--widths", "32,64,64,64", "--latent", "16", "--repeat", "2"],
    "pipeline": ["--hidden", "128", "--heads", "2", "--size", "128", "--t5-length", "64", "--repeat", "2"],
    "convert": ["--quick"],
    "fullsize": ["--model", "tiny", "--sizes", "128", "--batches", "1,2", "--steps", "2", "--attention", "auto"],
    "endtoend": ["--model", "tiny", "--sizes", "128", "--batches", "1,2", "--steps", "2", "--repeat", "1"],
    "lora": ["--hidden", "128", "--heads", "2", "--size", "128", "--t5-length", "64", "--repeat", "3"],
    "shapes": ["--combos", "8"],
    "quantization": ["--hidden", "64", "--heads", "2", "--depth", "2", "--single", "2"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default="all", choices=BENCHMARKS + BY_NAME + ("all",),
                        help="which benchmark (default all: every one in turn but tpu, which writes docs/tpu.md)")
    parser.add_argument("--quick", action="store_true", help="small configs: every section in a few minutes on a CPU")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="passed to the benchmark (one NAME only); `fluxjax bench NAME --help` lists them")


def run(args) -> int:
    from fluxjax.bench.common import RESULTS

    names = BENCHMARKS if args.name == "all" else (args.name,)
    if args.options and len(names) > 1:
        print("fluxjax bench: options go to one benchmark; name it", file=sys.stderr)
        return 2
    sections = {}
    for name in names:
        try:
            module = importlib.import_module(f"fluxjax.bench.{name}")
        except ImportError as e:
            print(f"fluxjax bench {name}: {e.name} is not installed; install the test extra: "
                  "pip install 'fluxjax[test]'", file=sys.stderr)
            return 2
        print(f"== {name} ==", flush=True)
        start = len(RESULTS)
        module.main((QUICK.get(name, []) if args.quick else []) + list(args.options))
        sections[name] = RESULTS[start:]
    print(table(sections))
    if args.json:
        import jax

        with open(args.json, "w") as f:
            json.dump({"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                   "devices": [str(d) for d in jax.devices()]},
                       "quick": args.quick, "sections": sections}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def table(sections: dict[str, list[dict]]) -> str:
    """Every recorded figure, one row each, with the reference and the ratio where there is one."""
    rows = [("section", "figure", "fluxjax", "reference", "ratio", "reference is")]
    for section, results in sections.items():
        for r in results:
            ref = "" if r["reference"] is None else f"{r['reference']:.4g} {r['unit']}"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            rows.append((section, r["name"], f"{r['fluxjax']:.4g} {r['unit']}", ref, ratio, r["against"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
