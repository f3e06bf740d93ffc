"""Dask's VersionMismatchWarning as the CLI prints it: nothing when only Python's patch level
differs (the compose image's Python against the host's), one line naming what differs else."""

from __future__ import annotations

from distributed.versions import VersionMismatchWarning, error_message

from pipeline.cli import _format_warning


def table(here: dict, scheduler: dict, workers: dict) -> str:
    """Dask's own warning text for these versions ({package: version} each)."""
    packages = lambda v: {"packages": {"dask": "2025.4.0", **v}}  # noqa: E731
    return error_message(packages(scheduler), {"w1": packages(workers)}, packages(here))["warning"]


def shown(message: str) -> str:
    """What Python's warning machinery writes to stderr for it under `convpipe`
    (``warnings.showwarning`` writes what ``formatwarning`` returns)."""
    return _format_warning(message, VersionMismatchWarning, "client.py", 1595)


def test_only_pythons_patch_level_differs_prints_nothing():
    message = table(
        {"python": "3.11.7.final.0"}, {"python": "3.11.2.final.0"}, {"python": "3.11.2.final.0"}
    )
    assert "Mismatched versions" in message  # Dask would have printed a table
    assert shown(message) == ""


def test_a_package_that_differs_is_one_line():
    message = table(
        {"python": "3.11.7.final.0", "numpy": "1.26.4"},
        {"python": "3.11.2.final.0", "numpy": "1.26.4"},
        {"python": "3.11.2.final.0", "numpy": "2.0.1"},
    )
    assert shown(message) == (
        "convpipe: warning: the cluster's versions differ from this host's: numpy 1.26.4 here, "
        "1.26.4 on the scheduler, 2.0.1 on the workers\n"
    )


def test_another_python_minor_version_is_said():
    message = table(
        {"python": "3.11.7.final.0"}, {"python": "3.12.1.final.0"}, {"python": "3.12.1.final.0"}
    )
    err = shown(message)
    assert err.count("\n") == 1 and "python 3.11.7.final.0 here, 3.12.1.final.0 on the" in err
