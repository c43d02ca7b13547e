"""Errors meant for people: each names the file, key or argument at fault and what was expected."""


class UsageError(ValueError):
    """Bad input from the user (an argument, a size, a missing folder); the CLI prints it in one line."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its keys or shapes are not what the model needs."""


class NonFiniteError(ValueError):
    """A computation came out with NaN or infinite values: an error of the run, not of its input
    (`fluxjax batch` counts it as a failed image, not a done one)."""
