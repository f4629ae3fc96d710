"""The host touchpoint table of docs/ARCHITECTURE.md is true: every host module attribute the
pack (asdm/, nodes/) reads and every ModelPatcher attribute it names has a row, and every name a
row gives is still used by the pack."""
import ast
import importlib.util
import os
import re

from asdm.harness import host

ROOT = host.REPO_ROOT
HOST_MODULES = ("comfy", "comfy_extras", "comfy_api", "nodes", "folder_paths", "execution", "utils",
                "comfyui_version", "server")
# ModelPatcher attribute names the pack also uses for other objects (tensors, json, files)
OTHER_MEANINGS = {"detach", "load", "size", "get_all_wrappers"}


def pack_sources():
    for d in ("asdm", "nodes"):
        for dp, _, fs in os.walk(os.path.join(ROOT, d)):
            for f in sorted(fs):
                if f.endswith(".py"):
                    p = os.path.join(dp, f)
                    with open(p, encoding="utf-8") as fh:
                        yield os.path.relpath(p, ROOT), fh.read()


def host_reads() -> dict:
    """Dotted host names the pack imports or reads (``comfy.ops.cast_bias_weight``), through any
    alias a module gives them, with the files that read them."""
    found = {}
    for rel, text in pack_sources():
        tree = ast.parse(text)
        alias = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                for a in n.names:
                    top = a.name.split(".")[0]
                    if top in HOST_MODULES and not (rel.startswith("nodes") and top == "nodes"):
                        alias[a.asname or top] = a.name if a.asname else top
                        found.setdefault(a.name, set()).add(rel)
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module.split(".")[0] in HOST_MODULES:
                for a in n.names:
                    alias[a.asname or a.name] = f"{n.module}.{a.name}"
                    found.setdefault(f"{n.module}.{a.name}", set()).add(rel)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute):
                chain, x = [], n
                while isinstance(x, ast.Attribute):
                    chain.append(x.attr)
                    x = x.value
                if isinstance(x, ast.Name) and x.id in alias:
                    parts = [p for p in reversed(chain) if not p.startswith("__")]
                    found.setdefault(".".join([alias[x.id]] + parts), set()).add(rel)
    return found


def table_tokens() -> tuple[set, set]:
    """(dotted host names, other names) the touchpoint table's first column gives."""
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Host touchpoints"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) > 20
    dotted, names = set(), set()
    for row in rows:
        for tok in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if tok.split(".")[0] in HOST_MODULES and re.fullmatch(r"[\w.]+", tok):
                dotted.add(tok)
            else:
                names.update(re.findall(r"[A-Za-z_]\w*", tok))
    return dotted, names


def covered(symbol: str, dotted: set, names: set) -> bool:
    for t in dotted:
        if symbol == t or t.startswith(symbol + "."):
            return True
        if symbol.startswith(t + ".") and (not _is_module(t) or symbol[len(t) + 1:].split(".")[0] in names):
            return True   # a row naming a module lists the attributes read from it by name
    return False


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_every_host_read_has_a_row():
    dotted, names = table_tokens()
    missing = {s: sorted(f) for s, f in host_reads().items() if not covered(s, dotted, names)}
    assert not missing, f"host touchpoints missing from docs/ARCHITECTURE.md: {missing}"


def test_every_model_patcher_attribute_has_a_row(tiny):
    import comfy.model_patcher
    attrs = {a for a in set(dir(comfy.model_patcher.ModelPatcher)) | set(vars(tiny)) if not a.startswith("__")}
    used = set()
    for _, text in pack_sources():
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.Attribute) and n.attr in attrs:
                used.add(n.attr)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in attrs:
                used.add(n.value)   # getattr(patcher, "backup"), hasattr(patcher, ...)
    _, names = table_tokens()
    missing = sorted(used - OTHER_MEANINGS - names)
    assert not missing, f"ModelPatcher attributes missing from the touchpoint table: {missing}"


def test_every_row_names_something_the_pack_uses():
    dotted, names = table_tokens()
    reads = host_reads()
    stale = [t for t in dotted if not any(s == t or s.startswith(t + ".") or t.startswith(s + ".") for s in reads)]
    source = "\n".join(text for _, text in pack_sources())
    words = set(re.findall(r"\w+", source))
    ignore = {"ModelPatcher", "transformer_options", "extra_options", "executor", "module", "newest"}
    stale += sorted(n for n in names - ignore if n not in words)
    assert not stale, f"touchpoint rows name what the pack no longer uses: {stale}"
