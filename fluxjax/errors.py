"""Errors meant for people: each names the file, key or argument at fault and what was expected."""


class UsageError(ValueError):
    """Bad input from the user (an argument, a size, a missing folder); the CLI prints it in one line."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its keys or shapes are not what the model needs."""


class NonFiniteError(ValueError):
    """A computation came out with NaN or infinite values: an error of the run, not of its input
    (`fluxjax batch` counts it as a failed image, not a done one)."""


def check_regular_file(path, name: str = "", error: type[ValueError] = UsageError) -> None:
    """Raise `error` ("NAME PATH: ...", one line) unless `path` is a regular file (or a link to one).

    Checked with os.stat before any open: opening a FIFO blocks until something writes to it, so
    a FIFO among the inputs would hang the run with no output; a device or socket is no input either.
    """
    import os
    import stat

    label = f"{name} {os.fspath(path)}" if name else os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except OSError as e:  # a loop of links, no permission on a folder of the path
        raise error(f"{label}: cannot be read ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((f"is {k}, not" for test, k in kinds if test(mode)), "is not")
    raise error(f"{label}: {kind} a regular file; refusing to open it")
