"""The house's floors, checked from the code's own imports (README, "Floor plan"):

1. the command line: study_cli/ (run_study.py is its shim);
2. the studies, the analysis and the bench: experiments/, analysis/, bench/;
3. the engine: study/ (flows, run, sweep, store, config, ...).

An arrow may run down or along a floor, never up; no set of modules imports itself round a circle;
the flow package stands alone; and the tracking store has one door, study/store.py."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FLOORS = {"study_cli": 1, "run_study": 1, "experiments": 2, "analysis": 2, "bench": 2, "study": 3}
PACKAGES = tuple(FLOORS)


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


def _sources() -> dict[str, Path]:
    out = {"run_study": ROOT / "run_study.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py") if (ROOT / package).is_dir() else ():
            out[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return out


def _modules() -> dict[str, set[str]]:
    return {name: _imports(path) for name, path in _sources().items()}


def _resolve(name: str, modules: dict[str, set[str]]) -> str | None:
    """The module an imported name lives in (``study.run.spec.RunSpec`` -> ``study.run.spec``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {_resolve(i, modules) for i in imports} - {m, None} for m, imports in modules.items()}


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_no_arrow_runs_up_a_floor():
    up = [(a, b) for a, targets in _edges().items() for b in targets if _floor(b) < _floor(a)]
    assert not up, f"imports running up a floor (importer -> imported): {sorted(up)}"


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of the import graph (Tarjan) with more than one module."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_no_circle_of_imports():
    """A package's __init__ counts as a module: one that re-exports a module importing the package back
    is a circle too."""
    circles = _circles(_edges())
    assert not circles, f"modules that import each other round a circle: {circles}"


def test_the_walk_sees_an_arrow_up_and_a_circle():
    """The checks above can fail: on a made-up graph they find what they look for."""
    modules = {"study.a": {"analysis.b"}, "analysis.b": {"study.a.thing"}}
    edges = {m: {_resolve(i, modules) for i in imports} - {m, None} for m, imports in modules.items()}
    assert edges == {"study.a": {"analysis.b"}, "analysis.b": {"study.a"}}
    assert [(a, b) for a, t in edges.items() for b in t if _floor(b) < _floor(a)] == [("study.a", "analysis.b")]
    assert _circles(edges) == [["analysis.b", "study.a"]]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # longer than two


def test_the_flow_package_imports_nothing_of_the_harness():
    for module, imports in _modules().items():
        if module.startswith("study.flows"):
            assert all(i.startswith("study.flows") for i in imports), (module, imports)


def test_the_engine_of_one_run_knows_nothing_of_sweeps_and_analysis_nothing_of_the_bench():
    for module, targets in _edges().items():
        if module.startswith("study.run"):
            assert not [t for t in targets if t.startswith("study.sweep")], module
        if module.startswith("analysis"):
            assert not [t for t in targets if t.startswith("bench")], module


# --- one door to the tracking store ---------------------------------------------------------------

# MLflow's server app must import MLflow's server to be one (`mlflow server --app-name realnvp-ui`)
MAY_IMPORT_MLFLOW = {"study.store", "study.ui_app"}
# the GPU check reads the store it made with its own SQL on purpose: an independent reading of what
# the harness wrote, on a machine that may hold only mlflow-skinny
INDEPENDENT_READERS = {ROOT / "scripts" / "gpu" / "check_helper.py"}


def _code_files() -> list[Path]:
    files = list(_sources().values()) + sorted((ROOT / "scripts").rglob("*.py"))
    return [f for f in files if f not in INDEPENDENT_READERS]


def _mlflow_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlflow":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "mlflow"]
    return found


def test_only_the_store_imports_mlflow():
    sources = {path: name for name, path in _sources().items()}
    offenders = [str(p.relative_to(ROOT)) for p in _code_files()
                 if _mlflow_imports(p) and sources.get(p) not in MAY_IMPORT_MLFLOW]  # fmt: skip
    assert not offenders, f"modules that import mlflow besides study/store.py: {offenders}"
    assert _mlflow_imports(ROOT / "study" / "store.py")  # the check looks at real imports


def test_no_process_wide_tracking_uri_and_no_client_without_a_uri():
    """Nothing sets MLflow's process-wide tracking URI, every MlflowClient is made with a URI, and the
    store's files (SQLite) are opened by the store alone."""
    for path in _code_files():
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("set_tracking_uri", "set_experiment"):
                raise AssertionError(f"{where}:{node.lineno} sets MLflow's process-wide state ({node.attr})")
            called = getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""
            if called == "MlflowClient":
                assert node.args or node.keywords, f"{where}:{node.lineno}: MlflowClient() without a URI"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and path != ROOT / "study" / "store.py":
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert "sqlite3" not in names, f"{where}:{node.lineno} opens the store's SQLite file itself"
