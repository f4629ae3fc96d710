"""The layering of docs/ARCHITECTURE.md, read from the code: which side imports which, no import
cycles, the pack's own modules imported at the top of modules, host versions told apart in
compat only. Parses the sources (nothing is imported), so it needs no host."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# side -> the sides it may import (itself included)
ALLOWED = {
    "entry": {"nodes"},
    "nodes": {"nodes", "engine"},
    "engine": {"engine"},
    "training": {"training", "engine"},
    "evaluation": {"evaluation", "training", "harness", "engine"},
    "harness": {"harness", "engine"},
}


def side(module: str) -> str:
    parts = module.split(".")
    if parts == ["__init__"]:
        return "entry"
    if parts[0] == "nodes":
        return "nodes"
    if parts[0] == "asdm" and len(parts) > 1 and parts[1] in ("training", "evaluation", "harness"):
        return parts[1]
    return "engine"


def modules() -> dict[str, str]:
    """Dotted name (from the repository root, the pack) -> file, for the pack's own code."""
    out = {"__init__": os.path.join(ROOT, "__init__.py")}
    for top in ("asdm", "nodes"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


MODULES = modules()


def _resolve(module: str, node) -> list[str]:
    """The pack modules an import statement of ``module`` names (others: [])."""
    is_pkg = MODULES[module].endswith("__init__.py")
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        # absolute: ``asdm`` is the pack's engine (scripts, the harness); ``nodes`` is ComfyUI's own
        return [n for n in names if n.split(".")[0] == "asdm" and n in MODULES]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if node.level == 0 and target.split(".")[0] != "asdm":
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}" if target else a.name
        out.append(sub if sub in MODULES else target)
    return [m for m in out if m in MODULES]


def imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(pack module it imports, line, at the top of the module)]."""
    out = {}
    for mod, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(mod, node):
                    found.append((target, node.lineno, id(node) in top))
        out[mod] = found
    return out


IMPORTS = imports()


def test_the_walk_sees_the_pack():
    assert {"asdm.inheritance", "asdm.training.trainer", "asdm.evaluation.metrics", "asdm.harness.host",
            "nodes.inheritance"} <= set(MODULES)
    assert ("asdm.hooks", True) in [(t, top) for t, _, top in IMPORTS["asdm.inheritance"]]
    assert ("asdm.topology", True) in [(t, top) for t, _, top in IMPORTS["nodes.inheritance"]]


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_go_one_way(mod):
    bad = [f"{mod}:{line} imports {t} ({side(mod)} -> {side(t)})" for t, line, _ in IMPORTS[mod]
           if side(t) not in ALLOWED[side(mod)]]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_the_packs_modules_are_imported_at_the_top(mod):
    late = [f"{mod}:{line} imports {t} inside a function" for t, line, top in IMPORTS[mod] if not top]
    assert not late, "; ".join(late)


def test_no_import_cycles():
    graph = {m: {t for t, _, top in found if top and t != m} for m, found in IMPORTS.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_host_versions_are_told_apart_in_compat_only():
    """Current ComfyUI's keyed wrappers (comfy.patcher_extension) are what tells the hosts apart;
    only compat imports them."""
    for mod, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  for a in n.names]
        if mod != "asdm.compat":
            assert not any("patcher_extension" in n for n in names), f"{mod} imports comfy.patcher_extension"


def test_the_check_can_fail():
    """The rules above catch what they are for (a forbidden arrow, a late import, a cycle)."""
    assert side("asdm.training.trainer") == "training" and "harness" not in ALLOWED["training"]
    assert side("asdm.harness.host") not in ALLOWED["engine"]
    tree = ast.parse("def f():\n    from . import hooks\n")
    node = tree.body[0].body[0]
    assert _resolve("asdm.inheritance", node) == ["asdm.hooks"] and id(node) not in {id(n) for n in tree.body}
