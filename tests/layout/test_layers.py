"""The package layout is the design: each layer imports only the layers below it, prediction and
execution never import each other, and no module imports one that depends on it (no cycles).
Function-local imports count too: a lazy import is still an arrow."""

import ast
import pathlib

import pytest

import pyengine

ROOT = pathlib.Path(pyengine.__file__).parent

# layer -> the layers it may import (itself always). `kernels` is pyengine.kernels (from kernels/).
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "model": {"core", "kernels"},
    "schedule": {"core", "model"},
    "predict": {"core", "model", "schedule"},
    "transport": {"core", "_native"},
    "execute": {"core", "model", "schedule", "transport", "kernels"},
    "commbench": {"core", "transport", "execute", "report"},
    "report": {"core", "model", "schedule", "predict", "execute"},
    "serve": {"core", "model", "execute", "transport"},
    "cli": {"core", "model", "schedule", "predict", "execute", "transport", "report", "commbench",
            "kernels", "serve"},
    "_native": set(),
    "__init__": {"core", "execute", "serve"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(("pyengine", *rel.parts)).removesuffix(".__init__")] = path
    kernels = pathlib.Path(list(__import__("pyengine.kernels").kernels.__path__)[0])
    for path in kernels.glob("*.py"):
        out[f"pyengine.kernels.{path.stem}".removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST):
    """Every node that runs, at any depth (lazy imports included); `if TYPE_CHECKING:` blocks
    hold annotations only and are skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Every pyengine module `name` imports when it runs, at any depth of the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            # `from pkg import submodule` depends on the submodule (a parent package is always
            # imported first by Python itself, so that implicit edge is not an arrow here).
            found |= subs if len(subs) == len(node.names) else {base} | subs
    return {m for m in found if m in MODULES and m not in (name, "pyengine")}


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_lower_layers(module):
    layer = _layer(module)
    allowed = ALLOWED[layer] | {layer}
    bad = sorted(m for m in GRAPH[module] if _layer(m) not in allowed)
    assert not bad, f"{module} ({layer}) imports {bad}; {layer} may import only {sorted(allowed)}"


def test_prediction_and_execution_never_meet():
    for module, deps in GRAPH.items():
        if _layer(module) == "predict":
            assert not any(_layer(d) == "execute" for d in deps), module
        if _layer(module) == "execute":
            assert not any(_layer(d) == "predict" for d in deps), module


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


MAX_LINES = 400
CSRC = ROOT.parent / "csrc"


def test_no_file_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_native_source_over_400_lines():
    sources = sorted(p for p in CSRC.iterdir() if p.suffix in {".cpp", ".hpp", ".h", ".cu"})
    assert sources, f"no C++ sources under {CSRC}"
    long = {p.name: n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_two_modules_import_each_other_even_for_types_only():
    # a TYPE_CHECKING import one way and a call the other is still a circle a reader must follow
    def every(path: pathlib.Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
                names |= subs if len(subs) == len(node.names) else {node.module} | subs  # as _imports
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names & MODULES.keys()

    deps = {name: every(path) - {name} for name, path in MODULES.items()}
    mutual = sorted({tuple(sorted((a, b))) for a in deps for b in deps[a] if a in deps.get(b, ())})
    assert not mutual, f"modules that import each other: {mutual}"
