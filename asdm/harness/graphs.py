"""API- and UI-format graphs: the bundled graphs in example_workflows/ (the folder current
ComfyUI's template browser reads) are UI format, generated from their API twins in
example_workflows/api/ with the host's own node definitions and a note each
(scripts/make_workflows.py), so the two cannot drift apart; tests and the main job edit the API
twins by node title or class."""
from __future__ import annotations

import json
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO_ROOT, "example_workflows")   # UI format, with a <name>.jpg thumbnail each
API_DIR = os.path.join(EXAMPLES, "api")                    # their API-format twins
NOTE = "Note"   # the front end's own note node: UI only, never in an API graph

# What each bundled graph shows, in the Note node at its top (the API twins have no notes).
NOTES = {
    "assembly_m2_sd15.json":
        "A-SDM Assemble UNet, the paper's M2 recipe: the shallow blocks (dn0, dn1, up2, up3) of "
        "BK-SDM Base with the deep part of SD1.5, sampled, and saved with A-SDM Save UNet to "
        "output/unet. Needs your SD1.5 checkpoint and a diffusers BK-SDM Base at "
        "models/unet/bk-sdm-base/unet/diffusion_pytorch_model.safetensors (nothing is downloaded).",
    "auto_cache_compare_embedded.json":
        "With and without A-SDM Auto Cache, side by side on the embedded model (runs out of the box, "
        "on a CPU): the same prompt, seed and 20 steps, the top row as it is, the bottom row through "
        "Auto Cache with its defaults (speed 2.0, calibration auto). The first queue calibrates: Auto "
        "Cache computes every step fully and profiles the model, so both rows match. Edit the prompt "
        "and queue again to compare.",
    "auto_cache_sd15.json":
        "A-SDM Auto Cache between Load Checkpoint and the KSampler: one knob, speed (2.0: the target "
        "UNet FLOP ratio); what reuses an earlier step's output, and on which steps, is calibrated on "
        "your model. The first run with a new model, sampler, schedule or size computes fully (its "
        "image is full compute's) and writes a profile; later runs (a new seed or prompt) reach the "
        "target. Needs your SD1.5 checkpoint (nothing is downloaded).",
    "embedded_s1_inheritance.json":
        "Runs out of the box on the embedded model (64x64 scenes of coloured shapes, on a CPU). "
        "A-SDM UNet Switch samples steps 0-7 with the embedded BK-SDM Base and the rest with the "
        "full model, which A-SDM Feature Inheritance speeds up further (EX3, period 5, residual "
        "reuse with forecast, the last 20 % of the steps full).",
    "feature_inheritance_sd15.json":
        "A-SDM Feature Inheritance with its defaults (EX3, period 3, span-output reuse with "
        "forecast) between Load Checkpoint and the KSampler: no training, any sampler. Needs your "
        "SD1.5 checkpoint. Its other inputs (units, reuse, forecast, the full final steps, where "
        "stored features are kept) are for fine-tuning the trade-off.",
    "feature_inheritance_sdxl.json":
        "A-SDM Feature Inheritance with its defaults (EX3, period 3, span-output reuse with "
        "forecast) on SDXL at 1024x1024: no training, any sampler. Needs your own SDXL checkpoint "
        "(sd_xl_base_1.0.safetensors or a fine-tune) in models/checkpoints; nothing is downloaded. "
        "SDXL's UNet has three levels, where EX3 names what EX2 does: everything but the shallowest "
        "level pair (dn0, up2) reuses its stored output, so an inheriting step computes about 7 % "
        "of a full one.",
    "gri_sd15.json":
        "A-SDM GRI Attention in the highest-resolution attention units (dn0, up3): each token "
        "attends to its own 16x16 region and to keys pooled 4x4 over the whole latent. Without "
        "training it approximates full attention; a UNet distilled with GRI matches it best. "
        "Needs your SD1.5 checkpoint.",
    "inheritance_compare_embedded.json":
        "With and without A-SDM Feature Inheritance, side by side: the same prompt, seed and 20 "
        "steps, the top row on the embedded model as it is, the bottom row through A-SDM Feature "
        "Inheritance with its defaults. Runs out of the box on the embedded model (on a CPU); "
        "compare the two Save Image outputs.",
    "switch_s1_sd15.json":
        "The paper's S1 switching: A-SDM UNet Switch runs BK-SDM Base for steps 0-9 of 25 and "
        "SD1.5 for the rest. Needs your SD1.5 checkpoint and a diffusers BK-SDM Base at "
        "models/unet/bk-sdm-base/unet/diffusion_pytorch_model.safetensors (nothing is downloaded).",
    "switch_s1_sdxl.json":
        "The paper's S1 switching on SDXL: A-SDM UNet Switch runs SSD-1B (SDXL's block-removed "
        "student, same text encoders and VAE) for steps 0-9 of 25 and SDXL for the rest. Needs your "
        "SDXL checkpoint in models/checkpoints and SSD-1B's UNet in models/unet: its diffusers folder "
        "at models/unet/ssd-1b/unet/diffusion_pytorch_model.safetensors, or a single-file UNet picked "
        "in the loader (nothing is downloaded).",
}


def bundled() -> list[str]:
    """The bundled graphs' file names (each has its API twin, its UI graph and its thumbnail)."""
    return sorted(f for f in os.listdir(API_DIR) if f.endswith(".json"))


def load_api_workflow(name: str) -> dict:
    with open(os.path.join(API_DIR, name)) as f:
        return json.load(f)


def load_ui_workflow(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name)) as f:
        return json.load(f)


def ui_workflow(name: str) -> dict:
    """The UI graph of a bundled graph, as scripts/make_workflows.py writes it."""
    return api_to_ui(load_api_workflow(name), note=NOTES[name])


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
            listed = choices(v[0], opts)
            inputs[name] = opts.get("default", listed[0] if listed else None)
    return {"class_type": class_type, "inputs": inputs}


# "COMBO": a combo as V3 nodes declare it (("COMBO", {"options": [...]})); V1 nodes give the list itself
_WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
_SEED_INPUTS = ("seed", "noise_seed")


def has_control_widget(name: str, opts: dict) -> bool:
    """Whether the current front end adds a "control after generate" widget (a value saved after
    the input's own) to an INT input: to the seed names unless the input says
    control_after_generate: False, and to any input that asks for one. (The early front end adds
    one to the seed names whatever the input says.)"""
    return bool(opts.get("control_after_generate", name in _SEED_INPUTS))


def _input_specs(cls) -> list[tuple[str, object, dict]]:
    spec = cls.INPUT_TYPES()
    return [(k, v[0], v[1] if len(v) > 1 else {}) for sec in ("required", "optional")
            for k, v in spec.get(sec, {}).items()]


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def choices(kind, opts: dict) -> list | None:
    """A combo input's choices, from either form of its spec: V1's ([choices], {...}) or V3's
    ("COMBO", {"options": [choices], ...}); None for any other input."""
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options") or [])
    return None


def widget_values(cls, inputs: dict) -> list:
    out = []
    for name, kind, opts in _input_specs(cls):
        if is_widget(kind) and name in inputs:
            out.append(inputs[name])
            if kind == "INT" and has_control_widget(name, opts):
                out.append("fixed")
    return out


def api_to_ui(api: dict, note: str | None = None) -> dict:
    """A graph ComfyUI's front end opens, laid out in columns by dependency depth; a node's
    "_meta": {"title": ...} becomes its title. ``note``: the text of a Note node above the graph."""
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
    top = 40 + (NOTE_HEIGHT + 60 if note else 0)
    links, ui_nodes, column_y = [], {}, {}
    for nid in sorted(api, key=int):
        cls = nodes.NODE_CLASS_MAPPINGS[api[nid]["class_type"]]
        col = depth[nid]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        height = _node_height(cls, len(names))
        y = column_y.get(col, top)
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
        for name, kind, _ in _input_specs(cls):
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
    last = max(int(k) for k in api)
    if note:
        last += 1
        width = 400 * (max(depth.values()) + 1) - 60
        ui_nodes[str(last)] = {
            "id": last, "type": NOTE, "pos": [40, 40], "size": [width, NOTE_HEIGHT], "flags": {},
            "order": len(api), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
            "widgets_values": [note], "color": "#432", "bgcolor": "#653"}
    return {"last_node_id": last, "last_link_id": len(links),
            "nodes": list(ui_nodes.values()), "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [20, 20]}}, "version": 0.4}


NOTE_HEIGHT = 110


def _node_height(cls, n_outputs: int) -> int:
    """Room for a node's slots and widgets, as the front end draws them (advanced inputs too:
    0.3.64's front end shows them; one that folds them leaves the room empty)."""
    slots = widgets = 0
    for name, kind, opts in _input_specs(cls):
        if not is_widget(kind):
            slots += 1
        else:
            widgets += 4 if opts.get("multiline") else 1 + (kind == "INT" and has_control_widget(name, opts))
    return 30 + 20 * max(slots, n_outputs) + 24 * widgets + 10
