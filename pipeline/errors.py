"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""


class ConvpipeError(Exception):
    """Base class of user-facing errors (bad input, missing files, unreachable services)."""


class DataError(ConvpipeError):
    """A data source or store is missing, corrupt or not what was expected."""


class TrainingError(ConvpipeError):
    """Training cannot start or cannot go on (bad settings, diverged loss, lost cluster)."""


class Terminated(KeyboardInterrupt):
    """The process was told to end (SIGTERM): stopped like Ctrl-C, exit status 128 + 15."""
