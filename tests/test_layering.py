"""The layering, read from the code's own imports (every import, module-level or inside a function):

- the units of ``thinkfast`` (a top-level module, or a package with everything in it) import each other without
  cycles, so no two packages import each other;
- library code (everything but ``stages/``, ``pipeline.py`` and ``cli.py``) never imports the stage layer;
- no benchmark imports a stage module: benchmarks use library code, as a user's script would (or run whole
  stages through ``thinkfast.pipeline``, as the command line does).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "thinkfast"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STAGE_LAYER = {"stages", "pipeline", "cli"}


def _imports(path: Path, rel: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line, the imported thinkfast module as parts below ``thinkfast``) for every import in ``path``; ``rel`` is
    the file's parts below ``thinkfast`` (for relative imports; empty for files outside the package)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: max(0, len(rel) - node.level)]
                if node.module:
                    out.append((node.lineno, base + node.module.split(".")))
                else:  # from . import a, b
                    out += [(node.lineno, base + [a.name]) for a in node.names]
            elif node.module and node.module.split(".")[0] == "thinkfast":
                parts = node.module.split(".")[1:]
                out += [(node.lineno, parts)] if parts else [(node.lineno, [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1:]) for a in node.names
                    if a.name.split(".")[0] == "thinkfast" and "." in a.name]
    return out


def _unit(parts) -> str:
    return parts[0].removesuffix(".py")


def _graph() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: "file:line" of one such import}."""
    graph: dict[str, dict[str, str]] = {}
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).parts
        if rel == ("__init__.py",):
            continue
        src = _unit(rel)
        graph.setdefault(src, {})
        for line, parts in _imports(f, rel):
            if parts and _unit(parts) != src:
                graph[src].setdefault(_unit(parts), f"{f.relative_to(SRC.parent)}:{line}")
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_the_units_of_the_package_import_each_other_without_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    where = [{a: {b: graph[a][b] for b in comp if b in graph[a]} for a in comp} for comp in cycles]
    assert not cycles, f"import cycles between units: {where}"


def test_library_code_never_imports_the_stage_layer():
    bad = [f"{src} -> {dst} ({at})" for src, deps in _graph().items() if src not in STAGE_LAYER
           for dst, at in deps.items() if dst in STAGE_LAYER]
    assert not bad, bad


def test_no_benchmark_imports_a_stage_module():
    bad = [f"{f.name}:{line} imports thinkfast.{'.'.join(parts)}" for f in sorted(BENCHMARKS.glob("*.py"))
           for line, parts in _imports(f, ()) if parts and _unit(parts) == "stages"]
    assert not bad, bad


def test_the_checks_see_a_cycle_and_a_stage_import():
    """The checks can fail: a made-up graph with a cycle and a library unit importing the stage layer."""
    graph = {"a": {"b": "x:1"}, "b": {"a": "y:2", "stages": "y:3"}, "stages": {"a": "z:1"}}
    assert _cycles(graph) == [["a", "b", "stages"]]
    assert _cycles({"a": {"b": "x:1"}, "b": {}}) == []
