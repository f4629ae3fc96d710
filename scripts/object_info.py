"""Prints the pack's nodes as the host's ``/object_info`` describes them, as JSON (sorted keys), for
comparing a change of the node definitions before and after:

    read -r PY COMFY <<<"$(bash scripts/setup_host.sh current)"
    COMFYUI_PATH="$COMFY" "$PY" scripts/object_info.py > before.json

Each node's entry is made by the host's own ``node_info`` (the function its server's
``/object_info`` route calls, taken from its ``server.py``), on the pack as the host's loader
loaded it; ComfyUI's own nodes are left out. The UNet and experts folders list what the host's
model folders hold (normally nothing: a fresh work folder).
"""
import ast
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asdm.harness import host  # noqa: E402


def host_node_info():
    """The host's ``node_info(node_class)``: a closure in its server's route setup, compiled
    here from ``server.py`` with the module globals it reads."""
    import server   # late: the host's modules exist once it runs (compat.start_host)
    source = open(server.__file__, encoding="utf-8").read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "node_info":
            code = textwrap.dedent(ast.get_source_segment(source, node))
            namespace = dict(vars(server))
            exec(compile(code, server.__file__, "exec"), namespace)
            return namespace["node_info"]
    raise RuntimeError(f"no node_info in {server.__file__}")


def main() -> int:
    pack = host.boot().__name__
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    node_info = host_node_info()
    ours = sorted(k for k, c in nodes.NODE_CLASS_MAPPINGS.items() if c.__module__.startswith(pack + "."))
    out = {k: node_info(k) for k in ours}
    # the pack's module path holds the work folder's random name
    for info in out.values():
        if isinstance(info.get("python_module"), str):
            info["python_module"] = info["python_module"].rsplit(".", 1)[-1]
    print(json.dumps(out, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
