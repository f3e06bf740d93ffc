"""The ``convpipe`` command line.

Each command group lives in its own module and exposes ``register(subparsers)``, which adds
its parsers and sets ``func`` (called with the parsed namespace, returns an exit code).
Only this package knows about terminals, progress bars and exit codes: user errors
(:class:`pipeline.errors.ConvpipeError`) become one line on stderr and exit code 2.

A command module imports what its commands need inside them (lazy on purpose): ``convpipe
--help`` and the cheap commands answer without loading Numba, Dask and Zarr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from pipeline import __version__
from pipeline.errors import ConvpipeError, Terminated

#: command modules, in the order ``--help`` lists them
COMMAND_MODULES = ("pipeline.cli.data", "pipeline.cli.train", "pipeline.cli.jobs")


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line naming it (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="convpipe",
        description="Train CS231n convolutional networks data-parallel on a Dask cluster.",
    )
    parser.add_argument("--version", action="version", version=f"convpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _format_warning(
    message, category, filename, lineno, line=None, _default=warnings.formatwarning
) -> str:
    """convpipe's own warnings as one line ``convpipe: warning: ...``;
    others as Python words them."""
    if category.__module__.startswith("pipeline."):
        return f"convpipe: warning: {message}\n"
    if category.__name__ == "VersionMismatchWarning":
        return _version_mismatch(str(message))
    return _default(message, category, filename, lineno, line)


def _version_mismatch(table: str) -> str:
    """Dask's table of versions that differ between this client, the scheduler and the workers,
    as one line, or nothing when only Python's patch level differs (3.11.7 here, 3.11.2 in the
    compose image: nothing a run depends on)."""
    rows = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if row.lstrip().startswith("|") and len(cells) == 4 and cells[0] != "Package":
            rows.append(cells)
    if not rows:
        return f"convpipe: warning: {' '.join(table.split())}\n"
    differ = [
        r
        for r in rows
        if not (r[0] == "python" and len({".".join(v.split(".")[:2]) for v in r[1:]}) == 1)
    ]
    if not differ:
        return ""
    return (
        "convpipe: warning: the cluster's versions differ from this host's: "
        + "; ".join(
            f"{p} {here} here, {s} on the scheduler, {w} on the workers" for p, here, s, w in differ
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    )  # `kill`, `docker stop`
    try:
        _check_vector_width()
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone shows here, not as Python's complaint at exit
        return code
    except ConvpipeError as exc:
        print(f"convpipe: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _output_closed()
    except OSError as exc:  # a file of ours (a full disk, a permission), not the cluster's
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"convpipe: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Terminated as exc:
        print(f"convpipe: terminated (SIGTERM){_going_on(exc)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as exc:
        print(f"convpipe: interrupted{_going_on(exc)}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _going_on(exc: KeyboardInterrupt) -> str:
    """How to go on after Ctrl-C: what the command added to the exception as its notes
    (``" at step 12; continue with: convpipe train --resume runs/x"``), or nothing."""
    return "".join(getattr(exc, "__notes__", ()))


def _output_closed() -> int:
    """The reader of the output went away (``convpipe status | head -1``): end quietly, as a
    process that SIGPIPE ends does (``git log | head``: no message, status 128 + SIGPIPE).
    Python's documented way: stdout pointed at devnull, so that its flush at exit does not fail
    again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _check_vector_width() -> None:
    """A bad CONVPIPE_VECTOR_BYTES or CONVPIPE_VECTOR_REGISTERS is one line before anything
    runs (not a traceback from the first kernel); Numba is imported for it only when one of
    them is set."""
    names = ("CONVPIPE_VECTOR_BYTES", "CONVPIPE_VECTOR_REGISTERS")
    if any(os.environ.get(name, "").strip() for name in names):
        from pipeline import fast_layers  # noqa: PLC0415 - loads Numba

        try:
            fast_layers.vector_bytes_setting()
            fast_layers.vector_registers_setting()
        except ValueError as exc:
            raise ConvpipeError(str(exc)) from None


def _terminate(signum, frame):
    """SIGTERM stops a command the way Ctrl-C does (a run keeps a checkpoint of its last step)."""
    raise Terminated()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
