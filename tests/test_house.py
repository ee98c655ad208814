"""The house rules, checked on the source itself: no import circle, trainers/ free of Ray, Optuna and MLflow,
MLflow only in orchestrator/tracking/, and no product file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("trainers", "orchestrator", "benchmarks")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, type_checking: bool = False) -> set[str]:
    """Every module named by an import in the file, function-local ones included; those under
    ``if TYPE_CHECKING:`` (never executed) only with ``type_checking``."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


MODULES = _modules()
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}
TYPED_IMPORTS = {name: _imports(path, type_checking=True) for name, path in MODULES.items()}


@pytest.mark.parametrize("imports", [IMPORTS, TYPED_IMPORTS], ids=["runtime", "with-type-hints"])
def test_no_import_circle_between_files(imports):
    """No two files import each other, directly or around a loop, also not for a type hint only: a type two
    files share lives one level below both."""
    graph = {name: {_owner(m) for m in imports[name]} - {None, name} for name in MODULES}
    # a package's __init__ re-exporting its own rooms is not a circle through the code
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    circles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("library", ["ray", "optuna", "mlflow"])
def test_trainers_never_import_the_orchestration_libraries(library):
    offenders = [
        name
        for name, imported in IMPORTS.items()
        if name.startswith("trainers") and any(m == library or m.startswith(library + ".") for m in imported)
    ]
    assert not offenders, f"{library} imported by {offenders}"


def test_mlflow_lives_in_the_tracking_room_only():
    offenders = [
        name
        for name, imported in IMPORTS.items()
        if any(m == "mlflow" or m.startswith("mlflow.") for m in imported)
        and not name.startswith("orchestrator.tracking")
    ]
    assert not offenders, f"mlflow imported outside orchestrator/tracking: {offenders}"


def test_no_product_file_over_the_limit():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def _owner(imported: str) -> str | None:
    """The project module an imported name belongs to (``a.b.C`` -> ``a.b``), or None outside it."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def test_benchmarks_are_not_installed_with_the_product():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["orchestrator*", "trainers*"]' in pyproject


def test_no_product_file_is_git_ignored():
    """A module the ignore rules hide never reaches a clone (a top-level `demo/` rule once hid
    orchestrator/demo/__main__.py, and `make demo` failed on a clean clone while every test passed)."""
    import subprocess

    paths = [str(path.relative_to(ROOT)) for path in MODULES.values()]
    done = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", *paths], capture_output=True, text=True
    )
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    assert done.stdout.split() == [], f"git-ignored product files: {done.stdout.split()}"


def test_the_tested_environment_is_inside_the_declared_ranges():
    """constraints.txt (what `make` installs and the suite runs on) satisfies every range in pyproject.toml,
    and the floors `make test-floors` installs are exactly the ranges' lower bounds."""
    import subprocess
    import sys

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    declared += [Requirement(r) for extra in ("dev", "weights") for r in extras[extra]]
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.lower().replace("_", "-")] = version
    for requirement in declared:
        version = pinned[requirement.name.lower().replace("_", "-")]
        assert requirement.specifier.contains(version), f"{requirement} excludes the tested {version}"
    floors = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "floors.py"), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(floors) == len(declared)
    for requirement, floor in zip(declared, floors, strict=True):
        version = floor.partition("==")[2]
        assert version and requirement.specifier.contains(version), (requirement, floor)
        assert not any(requirement.specifier.contains(v) for v in _just_below(version)), (requirement, floor)


def _just_below(version: str) -> list[str]:
    """Versions right below ``version`` (its last number minus one), which a floor must exclude."""
    parts = [int(p) for p in version.split(".")]
    if parts[-1] == 0:
        return []
    return [".".join(map(str, [*parts[:-1], parts[-1] - 1]))]
