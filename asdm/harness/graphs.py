"""API- and UI-format graphs: the example graphs in workflows/ are UI format, generated from
their API twins with the host's own node definitions (scripts/make_workflows.py), so the two
cannot drift apart; tests and the main job edit the API twins by node title or class."""
from __future__ import annotations

import json
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_api_workflow(name: str) -> dict:
    with open(os.path.join(REPO_ROOT, "workflows", "api", name)) as f:
        return json.load(f)


def find(api: dict, class_type: str, title: str | None = None) -> str:
    """The id of the one node of ``class_type`` (and ``title``, when given) in an API graph."""
    hits = [k for k, v in api.items() if v["class_type"] == class_type
            and (title is None or v.get("_meta", {}).get("title") == title)]
    if len(hits) != 1:
        raise KeyError(f"{len(hits)} nodes of class {class_type}" + (f" titled {title!r}" if title else ""))
    return hits[0]


def reachable(api: dict, output: str) -> dict:
    """The part of an API graph that ``output`` depends on (the other nodes dropped)."""
    keep, todo = set(), [output]
    while todo:
        nid = todo.pop()
        if nid not in keep:
            keep.add(nid)
            todo += [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in api.items() if k in keep}


def stock_node(class_type: str, **inputs) -> dict:
    """An API-format node of the host's own ``class_type``; required widget inputs not given
    take the host's default (hosts differ: current ComfyUI's UNETLoader has a weight_dtype)."""
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES().get("required", {})
    for name, v in spec.items():
        if name not in inputs and is_widget(v[0]):
            opts = v[1] if len(v) > 1 else {}
            inputs[name] = opts.get("default", v[0][0] if isinstance(v[0], list) else None)
    return {"class_type": class_type, "inputs": inputs}


_WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
_SEED_INPUTS = ("seed", "noise_seed")   # the front end adds a "control after generate" value


def _input_specs(cls) -> list[tuple[str, object]]:
    spec = cls.INPUT_TYPES()
    return [(k, v[0]) for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()]


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def widget_values(cls, inputs: dict) -> list:
    out = []
    for name, kind in _input_specs(cls):
        if is_widget(kind) and name in inputs:
            out.append(inputs[name])
            if name in _SEED_INPUTS:
                out.append("fixed")
    return out


def api_to_ui(api: dict) -> dict:
    """A graph ComfyUI's front end opens, laid out in columns by dependency depth; a node's
    "_meta": {"title": ...} becomes its title."""
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    titles = {k: v["_meta"]["title"] for k, v in api.items() if "title" in v.get("_meta", {})}
    depth: dict = {}

    def d(nid):
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    links, ui_nodes, column_y = [], {}, {}
    for nid in sorted(api, key=int):
        cls = nodes.NODE_CLASS_MAPPINGS[api[nid]["class_type"]]
        col = depth[nid]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        height = _node_height(cls, len(names))
        y = column_y.get(col, 40)
        column_y[col] = y + height + 60
        n = {"id": int(nid), "type": api[nid]["class_type"], "pos": [40 + 400 * col, y],
             "size": [340, height], "flags": {}, "order": 0, "mode": 0, "inputs": [],
             "outputs": [{"name": nm, "type": t, "links": [], "slot_index": i}
                         for i, (nm, t) in enumerate(zip(names, cls.RETURN_TYPES))],
             "properties": {"Node name for S&R": api[nid]["class_type"]},
             "widgets_values": widget_values(cls, api[nid]["inputs"])}
        if nid in titles:
            n["title"] = titles[nid]
        ui_nodes[nid] = n
    for nid in sorted(api, key=int):
        cls = nodes.NODE_CLASS_MAPPINGS[api[nid]["class_type"]]
        slot = 0
        for name, kind in _input_specs(cls):
            if is_widget(kind):
                continue
            v = api[nid]["inputs"].get(name)
            link = None
            if isinstance(v, list):
                link = len(links) + 1
                links.append([link, int(v[0]), v[1], int(nid), slot, kind])
                ui_nodes[v[0]]["outputs"][v[1]]["links"].append(link)
            ui_nodes[nid]["inputs"].append({"name": name, "type": kind, "link": link})
            slot += 1
    for order, nid in enumerate(sorted(api, key=lambda k: (depth[k], int(k)))):
        ui_nodes[nid]["order"] = order
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links),
            "nodes": list(ui_nodes.values()), "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [20, 20]}}, "version": 0.4}


def _node_height(cls, n_outputs: int) -> int:
    """Room for a node's slots and widgets, as the front end draws them."""
    spec = cls.INPUT_TYPES()
    slots = widgets = 0
    for sec in ("required", "optional"):
        for name, v in spec.get(sec, {}).items():
            if not is_widget(v[0]):
                slots += 1
            else:
                opts = v[1] if len(v) > 1 else {}
                widgets += 4 if opts.get("multiline") else 1 + (name in _SEED_INPUTS)
    return 30 + 20 * max(slots, n_outputs) + 24 * widgets + 10
