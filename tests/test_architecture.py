"""The project's shape, checked on its source: which way imports go, and how big a class or function gets.

- nothing in `drivers/` or `simulator/` imports `agent`;
- `agent/locate` (pure image work) imports neither `drivers`, the session, the steps nor `simulator`;
- no step imports `simulator`, and in `agent/` only `agent/commands` does (it wires simulators in);
- no class is longer than 300 lines and no function longer than 80 (definition line to last line).

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def _modules(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def _imported(path: Path, root: Path = ROOT) -> Iterator[str]:
    """Every module name `path` imports (absolute imports; relative ones are resolved to their package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module or ""


def _offenders(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    found = []
    for path in _modules(folder, root):
        for name in _imported(path, root):
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden):
                found.append(f"{path.relative_to(root)} imports {name}")
    return found


@pytest.mark.parametrize("folder", ["drivers", "simulator"])
def test_drivers_and_the_simulator_do_not_import_the_agent(folder: str) -> None:
    assert _offenders(folder, ("agent",)) == []


def test_the_locator_is_pixel_work_only() -> None:
    assert _offenders("agent/locate", ("drivers", "agent.session", "agent.steps", "simulator")) == []


def test_steps_do_not_import_the_simulator() -> None:
    assert _offenders("agent/steps", ("simulator",)) == []


def test_only_the_commands_wire_a_simulator_into_the_agent() -> None:
    found = [line for line in _offenders("agent", ("simulator",)) if not line.startswith("agent/commands/")]
    assert found == []


def test_the_import_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    (tmp_path / "agent" / "locate").mkdir(parents=True)
    (tmp_path / "agent" / "locate" / "probe.py").write_text(
        "import numpy\ndef f():\n    from drivers.base import Frame\n    from ..steps import visit\n    return Frame\n"
    )
    assert _offenders("agent/locate", ("drivers", "agent.steps"), root=tmp_path) == [
        "agent/locate/probe.py imports drivers.base",
        "agent/locate/probe.py imports agent.steps",
    ]


def _too_long(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if length > limit:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield f"{path.relative_to(ROOT)}:{node.lineno} {kind} {node.name} has {length} lines (> {limit})"


@pytest.mark.parametrize("folder", ["agent", "drivers", "simulator"])
def test_no_class_over_300_lines_and_no_function_over_80(folder: str) -> None:
    assert [line for path in _modules(folder) for line in _too_long(path)] == []
