"""The house's floors, checked from the code's own imports: the flow stands alone, the core never
imports the layers above it, and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("study", "analysis", "bench", "experiments")


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def _modules() -> dict[str, set[str]]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = _imports(path)
    return out


def _resolve(name: str, modules: dict[str, set[str]]) -> str | None:
    """The module an imported name lives in (``study.run.RunSpec`` -> ``study.run``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_the_flow_package_imports_nothing_of_the_harness():
    for module, imports in _modules().items():
        if module.startswith("study.flows"):
            assert all(i.startswith("study.flows") for i in imports), (module, imports)


def test_the_core_never_imports_the_layers_above_it():
    above = ("analysis", "bench", "run_study")
    for module, imports in _modules().items():
        if module == "study.cli":
            continue  # the command line is the top floor: it dispatches to every layer
        if module.startswith("study") or module.startswith("experiments"):
            assert not [i for i in imports if i.startswith(above)], module
        if module.startswith("study.run"):  # the engine of one run knows nothing of sweeps
            assert not [i for i in imports if i.startswith("study.sweep")], module
        if module.startswith("analysis"):
            assert not [i for i in imports if i.startswith("bench")], module


def test_no_two_modules_import_each_other():
    modules = _modules()
    edges = {m: {_resolve(i, modules) for i in imports} - {m, None} for m, imports in modules.items()}

    def is_package_of(a: str, b: str) -> bool:  # a package's __init__ re-exporting its own modules
        return b.startswith(a + ".")

    for a, targets in edges.items():
        for b in targets:
            if is_package_of(a, b) or is_package_of(b, a):
                continue
            assert a not in edges.get(b, set()), f"{a} <-> {b}"
