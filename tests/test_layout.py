"""The house: which module imports which, checked from the source (imports inside functions and
under TYPE_CHECKING included). No cycle, no lower layer importing a higher one, SQL only in
outbox/, and no part of runtime/ or service/ holding the Agent."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

# Lowest first: a module may import only its own layer or lower ones.
LAYERS = ["errors", "protocol sealed", "config", "outbox", "handlers", "service", "runtime", "cli", "agent"]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer.split()}
SQL = re.compile(r"\b(SELECT .+ FROM|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE TABLE)\b", re.S)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", "scripts", ".venv") or "examples" in rel.parts:
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            assert state.get(other) != 1, f"import cycle: {' -> '.join([*path, other])}"
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_no_lower_layer_imports_a_higher_one():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            top, dep_top = name.split(".")[0], dep.split(".")[0]
            if RANK[dep_top] > RANK[top]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_every_sql_statement_is_in_outbox():
    outside = []
    for name, path in modules().items():
        if name.startswith("outbox"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                outside.append(f"{name}: {node.value[:60]!r}")
    assert not outside, outside


def test_no_thread_holds_the_agent():
    for name, path in modules().items():
        if name.startswith(("runtime", "service")):
            text = path.read_text()
            assert not re.search(r"self\.agent\b(?!_)|^\s*(import|from) agent\b", text, re.M), name
