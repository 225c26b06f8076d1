"""The package's layout holds: no module imports itself back (lazy imports inside functions
included: a cycle hidden by a lazy import is how loading a model once started a pretraining), and
each sub-package imports only the layers below it, so a part can be read and tested without the
ones above."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "handrail"
# Lowest first. The top-level helpers (errors, config, folders) may be imported from anywhere.
LAYERS = ["helpers", "engine", "data", "runtime", "methods", "commands", "cli"]


def module_names() -> dict[str, Path]:
    """'engine.targets', 'methods' (a package's __init__), 'cli', ... -> file."""
    names = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names[".".join(parts)] = p
    return names


def imports(path: Path, modules: set[str], me: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "handrail":
            base = node.module.partition(".")[2]
            for a in node.names:  # `from handrail.engine import rollout` imports the module engine.rollout
                sub = f"{base}.{a.name}" if base else a.name
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("handrail.")}
    return (found & modules) - {me, ""}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else 0


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(path, set(modules), name) for name, path in modules.items()}


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


def test_the_finder_reads_every_form_of_import():
    g = graph()
    assert "commands.pretrain" in g["commands.sources"]  # from handrail.commands.pretrain import ...
    assert "engine.decoder" in g["runtime.models"]  # from handrail.engine import decoder
    assert "methods.base" in g["methods.sft"] and "methods" in g["commands.train"]  # lazy, inside a function


def test_no_module_of_the_package_imports_itself_back():
    found = cycle(graph())
    assert found is None, " -> ".join(found)


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(f"{a} imports {b}" for a, deps in graph().items() for b in deps
                    if layer(b) > layer(a) and b.split(".")[0] != a.split(".")[0])
    assert not upward, "; ".join(upward)
    assert layer("commands.train") > layer("methods.grpo") > layer("runtime.models") > layer("engine.rollout")
