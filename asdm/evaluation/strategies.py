"""The strategies the main job compares, and the graph each one runs on the embedded model.

Every graph is the bundled ``example_workflows/api/embedded_s1_inheritance.json`` rewired (by node class,
never by id): the stock CLIP Text Encode, KSampler, VAE Decode and Save Image nodes, A-SDM's
loaders and patch nodes, and a timer (``asdm.evaluation.timing``) right before the sampler.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import embedded
from ..harness import graphs
from . import deepcache, timing

WORKFLOW = "embedded_s1_inheritance.json"
MODES = (("P5", 5, 0.0), ("P5†", 5, 0.2), ("P2†", 2, 0.2))   # name, period, final_full_fraction


@dataclass
class Strategy:
    name: str                 # key in results: "full", "S1", "base", "CO6-P5d"
    label: str                # as the report shows it: "CO6 P5†"
    group: str                # "plain", "switch", "compressed", or the mode "P5", "P5†", "P2†"
    kind: str                 # "plain" | "fi" | "switch" | "unet"
    preset: str = ""          # fi
    period: int = 0
    tail: float = 0.0
    ranges: list = field(default_factory=list)   # switch: [(model, steps)], model "base" | "full"
    unet: str = ""            # unet: the family member ("base", "m2", "small-condconv", ...)
    experts: bool = False     # unet: with its ME-CondConv experts
    patch: tuple = ()         # attn: (node class, its inputs) applied to the full model
    size: int = 0             # image side in px (0: the embedded model's own, 64)
    units: str = ""           # fi: units added to the preset (preset "custom": the whole set)
    reuse: str = "residual"   # fi: "residual" | "output"
    forecast: bool = False    # fi
    depth: int = 0            # deepcache: the skip junction (period: its interval)


def strategies(steps: int, presets: list[str]) -> list[Strategy]:
    k = max(1, round(steps * 0.4))   # the paper's 10 of 25 steps on the small UNet
    out = [Strategy("full", "full compute", "plain", "plain"),
           Strategy("S1", f"S1 Base {k} + full {steps - k}", "switch", "switch", ranges=[("base", k), ("full", steps - k)]),
           Strategy("S2", f"S2 full {steps - k} + Base {k}", "switch", "switch", ranges=[("full", steps - k), ("base", k)]),
           Strategy("S3", f"S3 full {k} + Base {steps - k}", "switch", "switch", ranges=[("full", k), ("base", steps - k)])]
    for member, label in (("base", "Base"), ("small", "Small"), ("tiny", "Tiny"), ("m2", "M2")):
        out.append(Strategy(member, label, "compressed", "unet", unet=member))
    for member, label in (("small-condconv", "Small + ME-CondConv"), ("tiny-condconv", "Tiny + ME-CondConv")):
        out.append(Strategy(member, label, "compressed", "unet", unet=member, experts=True))
    for mode, period, tail in MODES:
        for p in presets:
            out.append(Strategy(f"{p}-{mode.replace('†', 'd')}", f"{p} {mode}", mode, "fi", preset=p,
                                period=period, tail=tail))
    return out


# The SDXL family's counterparts of the SD1.5 family's members, for the main job's SDXL column:
# block-removed students in the same order of size (Base keeps about two thirds of SD1.5's
# parameters, SSD-1B about half of SDXL's; Small and Tiny under half, KOALA-700M and Vega about
# a third), M2 as SDXL with SSD-1B's two shallowest level pairs.
SDXL_COUNTERPARTS = {"base": "ssd-1b", "small": "koala-700m", "tiny": "vega", "m2": "M2+ssd-1b",
                     "small-condconv": "koala-700m-condconv", "tiny-condconv": "vega-condconv"}


def on_sdxl(s: Strategy) -> Strategy:
    """``s`` as it runs on the SDXL family (asdm/evaluation/speed.py's Models names): the SD1.5
    family's members replaced by their SDXL counterparts."""
    if s.kind == "switch":
        return dataclasses.replace(s, ranges=[(SDXL_COUNTERPARTS.get(m, m), n) for m, n in s.ranges])
    if s.kind == "unet":
        return dataclasses.replace(s, unet=SDXL_COUNTERPARTS[s.unet])
    return s


# Inheritance modes against the project's DeepCache baseline (asdm/evaluation/deepcache.py):
# (name, period, final_full_fraction), the reuse modes, and DeepCache's junction depths x intervals.
MODE_SCHEDULES = (("P3", 3, 0.0), ("P5", 5, 0.0), ("P5†", 5, 0.2), ("P8†", 8, 0.2))
REUSE_MODES = (("residual", False), ("residual", True), ("output", False), ("output", True))
DEEPCACHE = ((2, 3), (2, 5), (3, 3), (3, 5))


def reuse_label(reuse: str, forecast: bool) -> str:
    return {"residual": "residual", "output": "span output"}[reuse] + (" + forecast" if forecast else "")


def mode_strategies(presets: list[str], schedules=MODE_SCHEDULES, deepcache=DEEPCACHE) -> list[Strategy]:
    """Every reuse mode of feature inheritance on ``presets`` at each schedule, and DeepCache."""
    out = []
    for p in presets:
        for mode, period, tail in schedules:
            for reuse, forecast in REUSE_MODES:
                tag = reuse + ("+forecast" if forecast else "")
                out.append(Strategy(f"{p}-{mode.replace('†', 'd')}-{tag}", f"{p} {mode}, {reuse_label(reuse, forecast)}",
                                    "modes", "fi", preset=p, period=period, tail=tail, reuse=reuse, forecast=forecast))
    for depth, interval in deepcache:
        out.append(Strategy(f"deepcache-d{depth}-n{interval}", f"DeepCache depth {depth}, interval {interval}",
                            "modes", "deepcache", period=interval, depth=depth))
    return out


ATTENTION_SIZE = 256   # px: latent 32x32, so the top level attends over 1024 tokens


def attention_strategies() -> list[Strategy]:
    """Self-attention accelerators at ATTENTION_SIZE: GRI (A-SDM), tuning-free and the trained
    GRI student (asdm-embedded-full-gri, distilled for w8 s2 at 256 px), against ComfyUI's own
    ToMe and HyperTile. HyperTile's default tile (256 px) does not split a 256 px image, so it runs with
    128 px tiles (a 2x2 split of the top level, as its default gives at 512 px)."""
    px = ATTENTION_SIZE
    gri = lambda w, p: ("ASDMGRIAttention", {"units": "dn0, up3", "window": w, "pool": p, "start": 0.0, "end": 1.0})  # noqa: E731
    return [Strategy("attn-full", "full attention", "attention", "attn", size=px),
            Strategy("gri-16x4", "GRI w16 s4", "attention", "attn", patch=gri(16, 4), size=px),
            Strategy("gri-8x2", "GRI w8 s2", "attention", "attn", patch=gri(8, 2), size=px),
            Strategy("gri-tuned", "GRI w8 s2, tuned", "attention", "attn", patch=gri(8, 2), size=px,
                     unet="full-gri"),
            Strategy("tome", "ToMe 0.5", "attention", "attn", patch=("TomePatchModel", {"ratio": 0.5}), size=px),
            Strategy("hypertile", "HyperTile 128", "attention", "attn", size=px, patch=(
                "HyperTile", {"tile_size": 128, "swap_size": 2, "max_depth": 0, "scale_depth": False}))]


def graph(s: Strategy, caption: str, seed: int, batch: int, steps: int, cfg: float, prefix: str,
          tag: str) -> dict:
    """The API graph that samples ``batch`` images of ``caption`` with strategy ``s``."""
    api = graphs.load_api_workflow(WORKFLOW)
    sampler = graphs.find(api, "KSampler")
    ks = api[sampler]["inputs"]
    api[ks["positive"][0]]["inputs"]["text"] = caption
    api[ks["negative"][0]]["inputs"]["text"] = ""
    px = s.size or embedded.IMAGE_SIZE
    api[ks["latent_image"][0]]["inputs"].update(width=px, height=px, batch_size=batch)
    ks.update(seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal")
    api[graphs.find(api, "SaveImage")]["inputs"]["filename_prefix"] = prefix
    full = [graphs.find(api, "ASDMLoadEmbeddedModel"), 0]
    small = graphs.find(api, "ASDMLoadCompressedUNet")
    fi = graphs.find(api, "ASDMFeatureInheritance2")
    switch = graphs.find(api, "ASDMUNetSwitch")
    if s.kind == "plain":
        model = full
    elif s.kind == "attn":
        model = full
        if s.unet:
            api[small]["inputs"].update(unet_name=embedded.family_name(s.unet), prediction="auto")
            model = [small, 0]
        if s.patch:
            api["asdm_attention"] = {"class_type": s.patch[0], "inputs": dict(s.patch[1], model=model)}
            model = ["asdm_attention", 0]
    elif s.kind == "fi":
        api[fi]["inputs"].update(model=full, preset=s.preset, units=s.units, period=s.period,
                                 final_full_fraction=s.tail, reuse=s.reuse, forecast=s.forecast)
        model = [fi, 0]
    elif s.kind == "deepcache":
        api["asdm_deepcache"] = {"class_type": deepcache.NODE, "inputs": {"model": full, "depth": s.depth,
                                                                          "interval": s.period}}
        model = ["asdm_deepcache", 0]
    elif s.kind == "switch":
        api[small]["inputs"].update(unet_name=embedded.family_name("base"), prediction="auto")
        src = {"base": [small, 0], "full": full}
        (m1, n1), (m2, _) = s.ranges
        api[switch]["inputs"].update(unit="steps", model_1=src[m1], start_1=0.0, end_1=float(n1),
                                     model_2=src[m2], start_2=float(n1), end_2=-1.0)
        model = [switch, 0]
    else:
        api[small]["inputs"].update(unet_name=embedded.family_name(s.unet), prediction="auto")
        model = [small, 0]
        if s.experts:
            api["asdm_condconv"] = {"class_type": "ASDMMECondConv", "inputs": {
                "model": model, "weights": embedded.family_name(s.unet), "units": "dn*.*.R, up*.*.R",
                "experts": 2, "init": "identity", "seed": 0}}
            model = ["asdm_condconv", 0]
    api["asdm_timer"] = {"class_type": timing.NODE, "inputs": {"model": model, "tag": tag}}
    ks["model"] = ["asdm_timer", 0]
    return graphs.reachable(api, graphs.find(api, "SaveImage"))
