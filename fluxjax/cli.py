"""The `fluxjax` command line. Exit 0 on success; on bad input, non-zero with a one-line reason."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("transformer", "t5", "vae")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fluxjax", description="FLUX.1 in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="time fluxjax against the PyTorch reference in the same run (needs the test extra)",
        description="Run a benchmark; `fluxjax bench NAME --help` lists its options.",
    )
    bench.add_argument("name", choices=BENCHMARKS + ("all",))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark")
    args = parser.parse_args(argv)

    if args.command == "bench":
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


if __name__ == "__main__":
    sys.exit(main())
