"""Small modules stay small (the anchors' per-file budget) and the README commands stay true."""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "sift_compiler").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_readme_and_ci_use_the_make_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _asserts(path: pathlib.Path):
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assert):
            yield node


def test_assertions_can_fail():
    """`assert x, y and z` checks only x (the rest is the message); `assert (x, msg)` never fails;
    `pytest.raises(Exception)` passes on any bug. Each one found here once hid a failure."""
    import ast
    files = list((ROOT / "tests").rglob("*.py")) + list((ROOT / "sift_compiler").rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{a.lineno}" for p in files for a in _asserts(p)
           if isinstance(a.test, ast.Tuple) or isinstance(a.msg, (ast.BoolOp, ast.Compare))]
    assert not bad, f"assertions that cannot fail as written: {bad}"
    broad = [str(p.relative_to(ROOT)) for p in files if p.resolve() != pathlib.Path(__file__).resolve()
             and ("raises(Exception" in p.read_text() or "raises(BaseException" in p.read_text())]
    assert not broad, f"name the exception you expect: {broad}"


# ------------------------------------------------------------------ layering: imports run one way, down
# The layers, bottom first (docs/architecture.md, "Layers"). A module may import from its own layer
# and the layers below it, never from a layer above; and no set of modules imports itself in a circle.
LAYERS = ("errors", "sparsity", "config", "capture", "analyses", "unit", "passes", "pipelines", "exporters",
          "api", "cli")
# module path (relative to sift_compiler, dotted; "" is the package root) -> layer. The longest
# matching prefix decides, so a package places every module in it unless one of them is listed.
PLACES = {
    "errors": "errors", "io": "errors", "version": "errors",          # what everything may use
    "compare": "errors", "module_tools": "errors",
    "sparsity": "sparsity", "distributed": "sparsity", "testing": "sparsity",   # masks, engines, FSDP glue
    "config": "config", "registry": "config",
    "capture": "capture", "initialization": "capture", "plan": "capture",                # weights of a captured model
    "analyses": "analyses",
    "unit": "unit", "report": "unit", "shortfall": "unit",            # views of a compiled unit
    "passes": "passes",
    "pipelines": "pipelines",
    "exporters": "exporters", "native": "exporters", "deploy": "exporters",
    "": "api", "api": "api", "compiler": "api", "latency": "api", "serialize": "api", "variants": "api",
    "cli": "cli", "integrations": "cli",                              # entry points: commands and trainers
}


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: pathlib.Path):
    """{module: {(imported module, line)}} from the syntax trees of every file under ``package``:
    imports at module level, inside functions and under TYPE_CHECKING alike (names relative to it)."""
    import ast
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" and name else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == package.name:
                    target = node.module.partition(".")[2]
                else:
                    continue
                # `from . import x` and `from .pkg import mod` import the module x / pkg.mod itself
                subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                hits = [s for s in subs if s in files]
                edges.update((t, node.lineno) for t in (hits or [target]))
            elif isinstance(node, ast.Import):
                edges.update((a.name.partition(".")[2], node.lineno) for a in node.names
                             if a.name.split(".")[0] == package.name)
        graph[name] = edges
    return graph


def layer_of(module: str) -> str:
    keys = [k for k in PLACES if module == k or module.startswith(k + ".") or k == ""]
    return PLACES[max(keys, key=len)]


def upward_imports(package: pathlib.Path):
    """'a (layer) -> b (higher layer), line N' for every import that runs up the layers."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{m} ({layer_of(m)}) -> {t or 'sift_compiler'} ({layer_of(t)}), line {line}"
                  for m, edges in import_graph(package).items() for t, line in edges
                  if rank[layer_of(t)] > rank[layer_of(m)])


def import_circles(package: pathlib.Path):
    """Every set of two or more modules that import each other in a circle (Tarjan's strongly connected components)."""
    graph = {m: {t for t, _ in edges if t != m} for m, edges in import_graph(package).items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                circles.append(sorted(members))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_every_module_has_a_layer():
    """A new module must be placed in PLACES (or sit in a placed package) before it can be checked."""
    unplaced = [m for m in import_graph(ROOT / "sift_compiler") if m and not any(
        m == k or m.startswith(k + ".") for k in PLACES if k)]
    assert not unplaced, f"place these modules in a layer (PLACES above, docs/architecture.md): {unplaced}"


def test_imports_run_down_the_layers():
    up = upward_imports(ROOT / "sift_compiler")
    assert not up, "imports that run up the layers (" + " -> ".join(LAYERS) + "):\n" + "\n".join(up)


def test_no_import_circles():
    circles = import_circles(ROOT / "sift_compiler")
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_the_layering_checks_fail_on_an_upward_import_and_a_circle(tmp_path):
    """The checks above are live: an upward import hidden in a function or under TYPE_CHECKING, and a
    circle inside one layer, added to a copy of the package, are each found and named."""
    import shutil
    package = tmp_path / "sift_compiler"
    shutil.copytree(ROOT / "sift_compiler", package, ignore=shutil.ignore_patterns("__pycache__"))
    assert not upward_imports(package) and not import_circles(package)  # the copy is as clean as the original
    io = package / "io.py"
    io.write_text(io.read_text() + "\n\ndef _late():\n    from . import version  # noqa\n")
    version = package / "version.py"
    version.write_text("from .io import atomic_path  # noqa\n" + version.read_text())
    assert import_circles(package) == [["io", "version"]] and not upward_imports(package)
    errors = package / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from .api import compile  # noqa\n")
    schedules = package / "sparsity" / "schedules.py"
    schedules.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..unit import X  # noqa\n"
                         + schedules.read_text())
    up = upward_imports(package)
    assert any(u.startswith("errors (errors) -> api (api)") for u in up), up
    assert any(u.startswith("sparsity.schedules (sparsity) -> unit (unit)") for u in up), up
