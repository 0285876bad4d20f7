"""The import graph of ``lorasup.supervisor`` has no cycle (issue 20).

Each module's imports are read with ``ast`` (every ``import``/``from ... import`` anywhere in
the file, inside functions too: a cycle hidden in a function is still a cycle, only one that
bites later; not those under ``if TYPE_CHECKING:``, which never run and only name types),
resolved to the modules of this repository, and the graph is searched for a cycle, which the
failure message prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lorasup"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def modules() -> dict[str, Path]:
    """Every module of lorasup.supervisor and of what it can reach inside the package."""
    found: dict[str, Path] = {}
    for top in ("supervisor", "trainers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            found[_module_name(path)] = path
    found[PACKAGE] = ROOT / "__init__.py"
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies in (``a.b.Class`` → ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The repository modules one file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    typing_only = {id(inner) for node in ast.walk(tree) if _is_type_checking_block(node)
                   for body in node.body for inner in ast.walk(body)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                prefix = ".".join(base[:keep])
                source = f"{prefix}.{node.module}" if node.module else prefix
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{source}.{alias.name}" for alias in node.names] or [source]
            targets.append(source)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            if not target.startswith(PACKAGE):
                continue
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (first node repeated at the end), or None; iterative DFS."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return None


def test_the_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_is_read_from_real_imports() -> None:
    edges = graph()
    assert "lorasup.supervisor.serve.store" in edges["lorasup.supervisor.serve.daemon"]
    # an import inside a function counts (servecommand imports the daemon only when serving)
    assert "lorasup.supervisor.serve.daemon" in edges["lorasup.supervisor.serve.servecommand"]


def test_no_import_cycle_in_the_supervisor() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_daemon_offers_what_the_api_asks() -> None:
    """The API is handed a JobsApi; the daemon is one (same methods, same parameters)."""
    import inspect

    from lorasup.supervisor.serve.daemon import Daemon
    from lorasup.supervisor.serve.errors import JobsApi

    asked = [name for name, member in vars(JobsApi).items()
             if callable(member) and not name.startswith("_")]
    assert {"submit", "show", "cancel", "run_dirs", "is_final", "metrics"} <= set(asked)
    for name in asked:
        offered = inspect.signature(getattr(Daemon, name)).parameters
        assert list(offered) == list(inspect.signature(getattr(JobsApi, name)).parameters), name
