"""The layout's rules, checked: no import cycles, the library never imports the application, library
errors speak the library's terms, and every module says why it exists in a docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("retrieval", "explainer")
#: The most lines a module may have: past it, a module is split where its data splits.
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports, at any depth: imports inside functions and under `TYPE_CHECKING`
    count too, since a cycle that only the type checker walks still ties two modules into one."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    assert _cycle_from(_graph()) is None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_for_the_type_checker_count(tmp_path: Path) -> None:
    module = tmp_path / "report.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from retrieval.training.evaluate import EvalReport\n"
        "def f() -> None:\n"
        "    from retrieval import imageio\n"
    )
    found = _imports("retrieval.training.report", module, _modules())
    assert found == {"retrieval.training.evaluate", "retrieval.imageio"}


def test_the_library_never_imports_the_application() -> None:
    leaks = {m: sorted(d for d in deps if d.startswith("explainer")) for m, deps in _graph().items()}
    assert {m: d for m, d in leaks.items() if m.startswith("retrieval") and d} == {}


def test_product_code_never_imports_the_test_helpers() -> None:
    """`retrieval.testing` holds actors that fail on purpose; what the demo ships is `retrieval.demo`."""
    users = {
        m
        for m, deps in _graph().items()
        if "retrieval.testing" in deps or any(d.startswith("retrieval.testing.") for d in deps)
    }
    assert {m for m in users if not m.startswith("retrieval.testing")} == set()


def test_library_errors_name_no_command_line_flags() -> None:
    """Messages of errors the library raises say what went wrong; the boundaries add `--flags`."""
    offenders: list[str] = []
    for path in (ROOT / "retrieval").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if (
                        isinstance(sub, ast.Constant)
                        and isinstance(sub.value, str)
                        and " --" in f" {sub.value}"
                    ):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_every_module_has_a_docstring_and_a_readable_size() -> None:
    missing, long = [], []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if not ast.get_docstring(ast.parse(text)) and text.strip():
            missing.append(name)
        if len(text.splitlines()) > MAX_LINES:
            long.append(name)
    assert missing == [] and long == []


def test_an_undeclared_import_fails_the_dependency_check(tmp_path: Path) -> None:
    """`make lint` runs deptry with the project's own settings: a module importing a package that
    pyproject.toml does not declare must fail it, as rich, starlette and anyio once went unnoticed."""
    import shutil
    import subprocess
    import sys

    deptry = Path(sys.executable).with_name("deptry")
    if not deptry.exists():
        pytest.skip("deptry is not installed in this environment")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "retrieval").mkdir()
    (tmp_path / "retrieval" / "__init__.py").write_text("import retrieval_undeclared_dependency\n")
    run = subprocess.run([str(deptry), "."], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "DEP001" in run.stdout + run.stderr, run.stdout + run.stderr
