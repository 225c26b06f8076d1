"""The package's modules import one another without a cycle, lazy imports inside functions
included: a cycle hidden by a lazy import is how loading a model once started a pretraining."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "handrail"


def imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "handrail":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("handrail.")}
    return (found & modules) - {path.stem}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {p.stem: imports(p, modules) for p in PACKAGE.glob("*.py")}
    assert "sources" in graph and "pretrain" in graph["sources"]  # the finder reads what it should
    assert cycle(graph) is None, " -> ".join(cycle(graph))
