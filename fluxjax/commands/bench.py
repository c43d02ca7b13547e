"""`fluxjax bench NAME [options]`: the benchmarks of fluxjax/bench/, each against the PyTorch reference."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("transformer", "t5", "vae", "pipeline", "convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BENCHMARKS + ("all",), help="which benchmark (all: every one in turn)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark; `fluxjax bench NAME --help` lists them")


def run(args) -> int:
    names = BENCHMARKS if args.name == "all" else (args.name,)
    for name in names:
        try:
            module = importlib.import_module(f"fluxjax.bench.{name}")
        except ImportError as e:
            print(f"fluxjax bench {name}: {e.name} is not installed; install the test extra: "
                  "pip install 'fluxjax[test]'", file=sys.stderr)
            return 2
        module.main(args.options)
    return 0
