"""pyproject.toml declares what the code imports: the package's imports in its dependencies
(or the tls extra), the tests' in the dev extra (or the dependencies), PyTorch only in the
bench extra."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tomli_w": "tomli-w",
}  # import name -> distribution
LOCAL = {"pipeline", "tests", "torch_reference"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def _floor(requirement: str) -> tuple[int, ...]:
    version = re.search(r">=\s*([\d.]+)", requirement).group(1)
    return tuple(int(p) for p in version.split("."))


def _requirements(*groups: str) -> dict[str, str]:
    reqs = list(PROJECT["dependencies"])
    for group in groups:
        reqs += PROJECT["optional-dependencies"][group]
    return {_name(r): r for r in reqs}


def _third_party_imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and n not in LOCAL}


def _distributions(modules) -> set[str]:
    return {DISTRIBUTION.get(m, m).lower() for m in modules}


def test_package_imports_are_dependencies():
    """Or in the tls extra: ``convpipe certs`` imports cryptography when it runs, saying how to
    install it when it is missing."""
    missing = _distributions(_third_party_imports("pipeline")) - set(_requirements("tls"))
    assert missing == set(), (
        f"imported by pipeline/ but not in [project] dependencies: {sorted(missing)}"
    )


def test_test_imports_are_in_the_dev_extra():
    missing = _distributions(_third_party_imports("tests")) - set(_requirements("dev"))
    assert missing == set(), (
        f"imported by tests/ but not in dependencies or the dev extra: {sorted(missing)}"
    )


def test_torch_is_only_a_benchmark_extra():
    assert "torch" not in _third_party_imports("pipeline")
    assert "torch" not in _requirements() and "torch" not in _requirements("dev")
    assert "torch" in _requirements("bench")
    assert _distributions(_third_party_imports("benchmarks")) <= set(_requirements("bench"))


def test_distributed_floor_has_identity_n_workers():
    """Scheduler.identity(n_workers=...) appeared in distributed 2025.4.0 (dask/distributed#9045);
    dask and distributed are released together and pinned to each other."""
    uses = [p for p in (ROOT / "pipeline").rglob("*.py") if "identity, n_workers" in p.read_text()]
    assert uses, "the floor below is there for scheduler.identity(n_workers=...)"
    reqs = _requirements()
    assert _floor(reqs["distributed"]) >= (2025, 4, 0)
    assert _floor(reqs["dask"]) == _floor(reqs["distributed"])
