"""The `fluxjax` command line. Exit 0 on success; on bad input, non-zero with a one-line reason.

Each command lives in its own module of fluxjax/commands/ with `HELP`, `add_arguments(parser)`
and `run(args) -> int`; modules are imported only when their command runs, so `fluxjax --help`
stays fast and a command's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import threading
import warnings

from fluxjax.errors import UsageError

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("fluxjax.commands.generate", "generate an image from a prompt"),
    "bench": ("fluxjax.commands.bench", "time fluxjax against the PyTorch reference in the same run"),
    "convert": ("fluxjax.commands.convert", "convert a hub folder or a BFL single file to Orbax checkpoints"),
    "plan": ("fluxjax.commands.plan", "per-device memory of a sharding strategy, from shapes only"),
    "batch": ("fluxjax.commands.batch", "generate a PNG for every prompt of a file, over hosts, resumable"),
    "train": ("fluxjax.commands.train", "fine-tune the transformer on a folder of captioned images, resumable"),
    "edit": ("fluxjax.commands.edit", "edit an image towards a target prompt with FlowEdit (no inversion)"),
}

DEBUG_ENV = "FLUXJAX_DEBUG"  # set to 1 for full tracebacks instead of one-line errors


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as every other error of the CLI (argparse itself
    prints the usage first): "fluxjax generate: error: argument --seed: invalid int value: '1e23'"."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def one_line_warnings(prefix: str):
    """Within: fluxjax's own warnings (a prompt cut to fit T5, one outside the shapes model's
    grammar) print as one line, "PREFIX: warning: MESSAGE", as errors do; others as Python shows them."""
    with warnings.catch_warnings():  # puts the previous display back on the way out
        previous = warnings.showwarning

        def show(message, category, *rest):
            if category.__module__.split(".")[0] == "fluxjax":
                print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                previous(message, category, *rest)

        warnings.showwarning = show
        yield


# What Orbax/TensorStore's background threads and coroutines raise once the command has stopped
# them (an error already reported, Ctrl-C): hundreds of lines after the one line that matters.
_AFTERMATH = ("Event loop is closed", "cannot schedule new futures after interpreter shutdown")


def _orbax_task_filter(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" about one of Orbax's tasks."""
    message = record.getMessage()
    return not ("Task exception was never retrieved" in message and "orbax" in message)


def quiet_libraries() -> None:
    """Keep a command's one-line error the only thing the user reads (not with FLUXJAX_DEBUG):
    absl's log (Orbax logs each failed write with its traceback, 230-395 lines on a full disk)
    shows only critical records, and the tracebacks of Orbax's leftover async reads and writes,
    which fail once the command has stopped them, are dropped (asyncio logs a task of Orbax's whose
    error nobody retrieved, 100 lines each). Other errors print as before."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").addFilter(_orbax_task_filter)

    def aftermath(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) in _AFTERMATH

    def orbax_coroutine(obj) -> bool:
        return "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", "")

    if getattr(sys.excepthook, "fluxjax", False):  # installed by an earlier main() of this process
        return
    unraisable, excepthook, thread_hook = sys.unraisablehook, sys.excepthook, threading.excepthook

    def on_unraisable(u):
        return None if aftermath(u.exc_value) or orbax_coroutine(u.object) else unraisable(u)

    def on_exception(t, v, tb):
        return None if aftermath(v) else excepthook(t, v, tb)

    def on_thread_exception(a):
        return None if aftermath(a.exc_value) else thread_hook(a)

    on_exception.fluxjax = True
    sys.unraisablehook, sys.excepthook, threading.excepthook = on_unraisable, on_exception, on_thread_exception


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = COMMANDS
    parser = Parser(prog="fluxjax", description="FLUX.1 in JAX/Flax.")
    parser.add_argument("command", choices=sorted(commands), help="; ".join(f"{n}: {h}" for n, (_, h) in commands.items()))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser.parse_args(argv[:1])  # prints help or the "invalid choice" error and exits
    name = argv[0]
    module = importlib.import_module(commands[name][0])
    sub = Parser(prog=f"fluxjax {name}", description=commands[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    if not os.environ.get(DEBUG_ENV):
        quiet_libraries()
    try:
        with one_line_warnings(f"fluxjax {name}"):
            return int(module.run(args) or 0)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fluxjax {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxjax {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
