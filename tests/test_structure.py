"""The package's structure where import-linter and ruff cannot see it: no private name crosses a
module, every import left inside a function says why it is lazy, and constraints.txt pins
versions pyproject.toml admits."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_names_imported(tree: ast.Module, importer: str) -> list[str]:
    """``from pipeline.x import _name`` in module ``importer``, unless ``_name`` is a private
    module of the importer's own package (``from pipeline._kernels import conv`` is public)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{importer}: from {node.module} import {alias.name}")
    return found


def test_no_private_name_is_imported_from_another_module():
    found = [
        hit for path, tree in _modules() for hit in private_names_imported(tree, _dotted(path))
    ]
    assert found == []


def test_the_check_finds_a_private_name():
    tree = ast.parse(
        "from pipeline.options import _literal\nfrom pipeline.options import literal\n"
    )
    assert private_names_imported(tree, "pipeline.jobs.spec") == [
        "pipeline.jobs.spec: from pipeline.options import _literal"
    ]


def lazy_imports_without_reason(tree: ast.Module, source: str) -> list[int]:
    """Lines of imports inside functions whose line has no ``lazy:`` reason."""
    lines = source.splitlines()
    bad = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if "lazy:" not in lines[node.lineno - 1]:
                        bad.append(node.lineno)
    return sorted(set(bad))


def test_every_lazy_import_outside_the_cli_says_why():
    """The CLI's command modules import inside each command (start-up time: said once, in
    pyproject.toml's ruff settings and in pipeline/cli/__init__.py); elsewhere each lazy import
    carries its reason on its line."""
    found = {}
    for path, tree in _modules():
        if path.parent.name == "cli":
            continue
        bad = lazy_imports_without_reason(tree, path.read_text())
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    assert found == {}


def test_the_check_finds_an_import_without_a_reason():
    source = "def f():\n    import os\n    import sys  # noqa: PLC0415 (lazy: a reason)\n"
    assert lazy_imports_without_reason(ast.parse(source), source) == [2]


# ---- dependencies: constraints.txt pins versions that pyproject.toml admits ----------------------


def _pins(text: str) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _unpinned_or_outside(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """The requirements (PEP 508 strings) whose package constraints.txt does not pin, or pins
    at a version the requirement's range excludes (markers that do not apply here skipped)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    bad = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req} (constraints.txt: {version or 'not pinned'})")
    return bad


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["tls"]
    pins = _pins((ROOT / "constraints.txt").read_text())
    assert _unpinned_or_outside(requirements, pins) == []


def test_the_constraints_check_finds_a_pin_outside_its_range():
    pins = _pins("numba==0.70.0\nzarr==3.1.6\n")
    assert _unpinned_or_outside(["numba>=0.59,<0.69", "zarr>=3.1.6,<3.2", "dask>=1"], pins) == [
        "numba<0.69,>=0.59 (constraints.txt: 0.70.0)",
        "dask>=1 (constraints.txt: not pinned)",
    ]
